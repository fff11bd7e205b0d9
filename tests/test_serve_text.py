"""Incremental detokenization with stop strings (TextStream), token by token."""
import pytest

from llava_jax.serve.generator import TextStream


def _feed(tok, text, stop=(), step=1):
    ids = tok(text, add_special_tokens=False).input_ids
    ts = TextStream(tok, stop)
    deltas = []
    for i in range(0, len(ids), step):
        deltas.append(ts.add(ids[i:i + step]))
        if ts.stopped:
            break
    deltas.append(ts.finish())
    return deltas, ts


@pytest.mark.parametrize("step", [1, 3])
def test_stream_equals_decode_and_no_partial_chars(tokenizer, step):
    text = "The kitchen has a white refrigerator 🦒 and wooden cabinets, 42% $19.99"
    deltas, ts = _feed(tokenizer, text, step=step)
    full = tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids, skip_special_tokens=True)
    assert "".join(deltas) == full == ts.text
    assert not any("\ufffd" in d for d in deltas)  # byte-fallback pieces are held until complete


def test_stop_string_cuts_and_is_held_back(tokenizer):
    text = "The image shows a cat. It is black and white."
    deltas, ts = _feed(tokenizer, text, stop=["cat.", "zebra"])
    assert ts.stopped and "".join(deltas) == "The image shows a "
    # a prefix of a stop string is not shown while it could still become the stop string
    shown = ""
    ts = TextStream(tokenizer, ["a dog"])
    for i in tokenizer("It is a do", add_special_tokens=False).input_ids:
        shown += ts.add([i])
    assert shown == "It is " and not ts.stopped
    assert shown + ts.finish() == "It is a do"  # released when generation ends without the stop
