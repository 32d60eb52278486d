"""Sampling (greedy, temperature, top-k, top-p, seeds), logprobs, and the stop/streaming logic of SequenceDecoder."""

from __future__ import annotations

import numpy as np
import pytest

from llama_relax.generation import FinishReason, SequenceDecoder
from llama_relax.sampling import Sampler, SamplingParams, log_softmax, top_logprobs

LOGITS = np.array([1.0, 3.0, 2.0, 0.5, 2.9], dtype=np.float32)


def test_greedy_is_argmax():
    assert Sampler(SamplingParams(temperature=0)).sample(LOGITS) == 1


def test_seed_reproduces_and_differs():
    a = Sampler(SamplingParams(temperature=1.5, seed=7))
    b = Sampler(SamplingParams(temperature=1.5, seed=7))
    seq_a = [a.sample(LOGITS, i) for i in range(50)]
    assert seq_a == [b.sample(LOGITS, i) for i in range(50)]
    assert seq_a[30:] == [b.sample(LOGITS, i) for i in range(30, 50)]  # a draw depends on (seed, step) only
    c = Sampler(SamplingParams(temperature=1.5, seed=8))
    assert seq_a != [c.sample(LOGITS, i) for i in range(50)]


def test_top_k_and_top_p_restrict_support():
    s = Sampler(SamplingParams(temperature=5.0, top_k=2, seed=0))
    assert {s.sample(LOGITS, i) for i in range(300)} == {1, 4}
    # probs at T=1: top two (ids 1, 4) hold ~0.64 of the mass; top_p=0.5 keeps exactly them
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0))
    assert {s.sample(LOGITS, i) for i in range(300)} == {1, 4}
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.3, seed=0))
    assert {s.sample(LOGITS, i) for i in range(100)} == {1}


def test_sampling_frequencies_follow_softmax():
    s = Sampler(SamplingParams(temperature=1.0, seed=3))
    counts = np.bincount([s.sample(LOGITS, i) for i in range(20000)], minlength=5) / 20000
    np.testing.assert_allclose(counts, np.exp(log_softmax(LOGITS)), atol=0.015)


def test_top_logprobs_sorted_and_normalized():
    lps = top_logprobs(LOGITS, 3)
    assert [lp.token_id for lp in lps] == [1, 4, 2]
    assert np.isclose(sum(np.exp(log_softmax(LOGITS))), 1.0)
    assert lps[0].logprob == pytest.approx(float(log_softmax(LOGITS)[1]))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ("",)}, "stop"),
        ({"stop": tuple("abcdefghijklmnopq")}, "stop"),
        ({"logprobs": 21}, "logprobs"),
    ],
)
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


class CharTokenizer:
    """Token i decodes to chr(i); 0 is EOS."""

    eos_token_ids = frozenset({0})

    def stream_decoder(self):
        class D:
            def push(self, t: int) -> str:
                return chr(t)

        return D()


def feed(dec: SequenceDecoder, text: str) -> tuple[str, FinishReason | None, int]:
    out = ""
    n = 0
    for ch in text:
        ev = dec.append(ord(ch))
        out += ev.text
        n += 1
        if ev.finish_reason:
            return out, ev.finish_reason, n
    return out, None, n


def test_stop_string_is_cut_and_held_back_text_released():
    dec = SequenceDecoder(SamplingParams(max_tokens=100, stop=("END", "xyz")), CharTokenizer(), 3, 1000)
    out, reason, n = feed(dec, "abc ENxEND tail")
    assert out == "abc ENx" and reason is FinishReason.STOP and n == len("abc ENxEND")


def test_stop_tokens_eos_and_ignore_eos():
    dec = SequenceDecoder(SamplingParams(max_tokens=10), CharTokenizer(), 3, 1000)
    assert dec.append(ord("a")).text == "a"
    ev = dec.append(0)
    assert ev.finish_reason is FinishReason.STOP and ev.text == ""
    dec = SequenceDecoder(SamplingParams(max_tokens=3, ignore_eos=True), CharTokenizer(), 3, 1000)
    assert [dec.append(t).finish_reason for t in (0, 0, 0)] == [None, None, FinishReason.LENGTH]
    dec = SequenceDecoder(SamplingParams(max_tokens=10, stop_token_ids=(ord("q"),)), CharTokenizer(), 3, 1000)
    assert feed(dec, "abq")[1] is FinishReason.STOP


def test_length_by_max_tokens_and_context_window():
    dec = SequenceDecoder(SamplingParams(max_tokens=4, stop=("zz",)), CharTokenizer(), 3, 1000)
    out, reason, n = feed(dec, "abcz")
    assert (out, reason, n) == ("abcz", FinishReason.LENGTH, 4)  # held-back "z" is flushed at the end
    dec = SequenceDecoder(SamplingParams(max_tokens=100), CharTokenizer(), 8, 10)
    assert feed(dec, "abcdef")[1:] == (FinishReason.LENGTH, 2)
