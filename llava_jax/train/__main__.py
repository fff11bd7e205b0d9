from llava_jax.train.main import run

run()
