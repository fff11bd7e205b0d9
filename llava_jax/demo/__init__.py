"""The offline demo: a tiny LLaVA trained end to end on a synthetic "shapes world", no downloads.

* :mod:`llava_jax.demo.world`, :mod:`~llava_jax.demo.scenes`, :mod:`~llava_jax.demo.dataset`:
  the world (vocabulary, scenes, questions with one definite answer) and the data set files;
* :mod:`llava_jax.demo.scoring`: scoring free-text answers, chance rates;
* :mod:`llava_jax.demo.tower`: the vision tower's pretraining, the demo's stand-in for CLIP;
* :mod:`llava_jax.demo.run`: the run (data, tokenizer, tower, stage 1, stage 2, held-out
  accuracy, export); ``python -m llava_jax.demo`` (``__main__.py``) starts it.

The library (``llava_jax.data``, ``train``, ``serve``, ...) does not import this package.
"""
