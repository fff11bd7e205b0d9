"""Inference and serving.

  engine.py     KV-cache generation: bucketed prefill, compiled chunked decode loop, continuous
                batching (DecodeBatch), per-row sampling, EOS, streaming, sharded meshes
  generator.py  ChatGenerator: messages + images -> prompt (template from the checkpoint),
                stop strings, text streaming; ChatSession (a running batch of completions)
  scheduler.py  batching of concurrent requests (continuous or windowed), queue limits
  server.py     OpenAI-compatible HTTP API + the web page on uvicorn/Starlette
                (`python -m llava_jax.serve`)
  web/          the chat page (plain HTML + JS)
  cli.py        terminal chat (`python -m llava_jax.chat`)
  quant.py      weight-only int8 / int4 for the LLM's linear layers
"""
