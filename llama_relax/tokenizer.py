"""`Tokenizer`: Llama-family tokenization on the `tokenizers` library, from an HF directory or a GGUF file.

`Tokenizer.from_hf_dir` loads `tokenizer.json` (plus `tokenizer_config.json`, `chat_template.jinja` and
`generation_config.json` when present). `Tokenizer.from_gguf` rebuilds the tokenizer from the GGUF's
`tokenizer.ggml.*` fields the way llama.cpp reads them: byte-level BPE (`gpt2`) with the `pre` type's
pre-tokenizer, or SentencePiece BPE (`llama`) with byte fallback. Control tokens become special added tokens,
user-defined tokens plain added tokens, so both encode as single ids.

`StreamDecoder` turns a stream of ids into text deltas that never split a UTF-8 character; the chat template
renders in a sandboxed jinja2 environment with the Hugging Face conventions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

# Token texts that end a turn or a document (llama.cpp's end-of-generation list); added to `eos_token_ids`
# when the vocabulary holds them as special (control) tokens.
EOG_TOKEN_TEXTS = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<end_of_utterance>",
)

# llama.cpp token types (`tokenizer.ggml.token_type`).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Byte-level pre-tokenizers per `tokenizer.ggml.pre` (llama.cpp's pre types, the ones Llama-family models use).
_PRE_GPT2 = frozenset({"default", "gpt-2", "gpt2"})
_PRE_DIGITS_GPT2 = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"})
_PRE_LLAMA3 = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"})
_LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPM_SPACE = "\u2581"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model's special ids, BOS default and chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        unk_token_id: int | None = None,
        pad_token_id: int | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        special_ids: Iterable[int] | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.unk_token_id = unk_token_id
        self.pad_token_id = pad_token_id
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        if special_ids is None:
            special_ids = [i for i, tok in backend.get_added_tokens_decoder().items() if tok.special]
        self.special_ids: frozenset[int] = frozenset(special_ids)
        eos = set(eos_token_ids)
        if eos_token_id is not None:
            eos.add(eos_token_id)
        for text in EOG_TOKEN_TEXTS:
            tid = backend.token_to_id(text)
            if tid is not None and tid in self.special_ids:
                eos.add(tid)
        self.eos_token_ids: frozenset[int] = frozenset(eos)

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `tokenizer.json`; BOS/EOS/add_bos/chat template from `tokenizer_config.json` when present."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        backend = tokenizers.Tokenizer.from_file(str(tj))
        config = _read_json(path / "tokenizer_config.json")
        gen_config = _read_json(path / "generation_config.json")

        def token_id(key: str) -> int | None:
            value = config.get(key)
            if isinstance(value, Mapping):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        bos = token_id("bos_token")
        if bos is None and isinstance(gen_config.get("bos_token_id"), int):
            bos = gen_config["bos_token_id"]
        eos = token_id("eos_token")
        gen_eos = gen_config.get("eos_token_id")
        gen_eos_ids = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if eos is None and gen_eos_ids:
            eos = gen_eos_ids[0]

        add_bos = config.get("add_bos_token")
        if add_bos is None:  # no flag: does the post-processor add BOS (e.g. Llama 3's TemplateProcessing)?
            with_special = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos is not None and bool(with_special) and with_special[0] == bos
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_id=eos,
            eos_token_ids=gen_eos_ids,
            unk_token_id=token_id("unk_token"),
            pad_token_id=token_id("pad_token"),
            add_bos_token=bool(add_bos),
            chat_template=_hf_chat_template(config, path),
        )

    @classmethod
    def from_gguf(cls, path_or_reader: str | os.PathLike[str] | Any) -> Tokenizer:
        """Build from a GGUF file's `tokenizer.*` fields (a path, or an open `gguf.GGUFReader`)."""
        import gguf

        reader = path_or_reader
        if isinstance(path_or_reader, (str, os.PathLike)):
            reader = gguf.GGUFReader(path_or_reader, "r")
        return cls.from_gguf_metadata(read_gguf_tokenizer_fields(reader))

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from already-read GGUF metadata (`{"tokenizer.ggml.tokens": [...], ...}`)."""
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            raise ValueError("GGUF has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
        types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

        def opt_id(key: str) -> int | None:
            value = meta.get(key)
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        hf_json = meta.get("tokenizer.huggingface.json")
        if hf_json:
            backend = tokenizers.Tokenizer.from_str(hf_json)
        elif model == "gpt2":
            backend = _byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre"))
        elif model == "llama":
            backend = _sentencepiece_bpe(
                tokens,
                meta.get("tokenizer.ggml.scores"),
                types,
                opt_id("tokenizer.ggml.unknown_token_id"),
                bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
            )
        else:
            raise ValueError(f"unsupported tokenizer.ggml.model {model!r} (supported: gpt2, llama)")

        control = [i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
        user = [i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
        if not hf_json:
            backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
            backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])

        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:  # llama.cpp's defaults: SentencePiece and Llama 3 add BOS, other BPE vocabularies don't
            add_bos = model == "llama" or meta.get("tokenizer.ggml.pre") in _PRE_LLAMA3
        extra_eos = [
            i for i in (opt_id("tokenizer.ggml.eot_token_id"), opt_id("tokenizer.ggml.eom_token_id")) if i is not None
        ]
        return cls(
            backend,
            bos_token_id=opt_id("tokenizer.ggml.bos_token_id"),
            eos_token_id=opt_id("tokenizer.ggml.eos_token_id"),
            eos_token_ids=extra_eos,
            unk_token_id=opt_id("tokenizer.ggml.unknown_token_id"),
            pad_token_id=opt_id("tokenizer.ggml.padding_token_id"),
            add_bos_token=bool(add_bos),
            chat_template=meta.get("tokenizer.chat_template"),
            special_ids=control,
        )

    # --------------------------------------------------------------- encoding

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens in the text map to their ids. `add_bos=None`: the model default."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids, add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
        """`encode` for several texts (parallel in the Rust backend)."""
        return [
            self._with_bos(e.ids, add_bos) for e in self.backend.encode_batch(list(texts), add_special_tokens=False)
        ]

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        if add_bos is None:
            add_bos = self.add_bos_token
        if not add_bos:
            return ids
        if self.bos_token_id is None:
            raise ValueError("add_bos requested but the tokenizer has no BOS token")
        return [self.bos_token_id, *ids]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD. `skip_special` drops special (control) tokens."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        """A fresh incremental detokenizer."""
        return StreamDecoder(self, skip_special=skip_special)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary piece of an id (e.g. "Ġworld"), None if out of range."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary piece, None if absent."""
        return self.backend.token_to_id(token)

    def token_to_str(self, token_id: int) -> str:
        """The decoded text of one token (U+FFFD where it holds part of a UTF-8 character)."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def is_special(self, token_id: int) -> bool:
        """Whether the id is a special (control) token."""
        return token_id in self.special_ids

    # ---------------------------------------------------------- chat template

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` with the model's chat template (HF conventions); extra kwargs go to the template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template (none in tokenizer_config.json / GGUF metadata)")
        import jinja2

        context = {
            "bos_token": self._token_text(self.bos_token_id),
            "eos_token": self._token_text(self.eos_token_id),
            "unk_token": self._token_text(self.unk_token_id),
            "pad_token": self._token_text(self.pad_token_id),
            **kwargs,
        }
        try:
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e

    @cached_property
    def _compiled_template(self) -> Any:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template is invalid: {e}") from e

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={sorted(self.eos_token_ids)}, "
            f"add_bos={self.add_bos_token}, chat_template={self.chat_template is not None})"
        )


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the new text; `flush()` the remainder at the end.

    Decodes a small window of recent ids and emits the part past what was already emitted, holding back while
    the window ends in an incomplete UTF-8 character (U+FFFD). The deltas plus `flush()` concatenate to
    `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self.ids: list[int] = []
        self._prefix = 0  # window start: ids before this are emitted and decode independently
        self._read = 0  # ids before this are emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still incomplete)."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever is held back (incomplete bytes render as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        decode = self._tok.decode
        prefix_text = decode(self.ids[self._prefix : self._read], self._skip) if self._read > self._prefix else ""
        new_text = decode(self.ids[self._prefix :], self._skip)
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text) :]
        if final:
            self._prefix = self._read = len(self.ids)
        return ""


# -------------------------------------------------------------------- builders


def _byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], pre: str | None) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE with the pre-tokenizer of llama.cpp's `pre` type."""
    pre = pre or "default"
    if pre in _PRE_DIGITS_GPT2:  # "\p{N}" then the GPT-2 regex, as llama.cpp and the HF tokenizers do
        pre_tok = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _PRE_GPT2:
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in _PRE_LLAMA3:
        pre_tok = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        known = sorted(_PRE_GPT2 | _PRE_DIGITS_GPT2 | _PRE_LLAMA3)
        raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r} (supported: {', '.join(known)})")
    bpe = models.BPE(
        vocab=_vocab_dict(tokens),
        merges=[_split_merge(m) for m in merges],
        ignore_merges=pre in _PRE_LLAMA3,
    )
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(
    tokens: Sequence[str],
    scores: Sequence[float] | None,
    types: Sequence[int],
    unk_id: int | None,
    add_space_prefix: bool,
) -> tokenizers.Tokenizer:
    """SentencePiece BPE (Llama 1/2) with byte fallback; merges derived from the scores as HF's converter does."""
    vocab = _vocab_dict(tokens)
    if scores is None:
        scores = [-float(i) for i in range(len(tokens))]
    if len(scores) != len(tokens):
        raise ValueError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    merges: list[tuple[str, str, float]] = []
    for piece, score, ttype in zip(tokens, scores, types, strict=True):
        if ttype not in (TOKEN_NORMAL, TOKEN_USER_DEFINED) or len(piece) < 2:
            continue
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((left, right, score) for left, right in local)
    merges.sort(key=lambda m: m[2], reverse=True)
    bpe = models.BPE(
        vocab=vocab,
        merges=[(left, right) for left, right, _ in merges],
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = tokenizers.Tokenizer(bpe)
    norm = [normalizers.Replace(" ", _SPM_SPACE)]
    dec = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        norm.insert(0, normalizers.Prepend(_SPM_SPACE))
        dec.append(decoders.Strip(" ", 1, 0))
    tok.normalizer = normalizers.Sequence(norm)
    tok.decoder = decoders.Sequence(dec)
    return tok


def _vocab_dict(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # duplicates (rare, in padded vocabularies) keep the first id
    return vocab


def _split_merge(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep:
        raise ValueError(f"malformed BPE merge {merge!r}")
    return left, right


def read_gguf_tokenizer_fields(reader: Any) -> dict[str, Any]:
    """The `tokenizer.*` key/values of an open `gguf.GGUFReader` as plain Python values."""
    import gguf

    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        types = field.types
        if not types:
            continue

        def scalar(idx: int, vtype: Any, field: Any = field) -> Any:
            part = field.parts[idx]
            if vtype == gguf.GGUFValueType.STRING:
                return bytes(part).decode("utf-8", errors="replace")
            value = part.tolist()[0]
            return bool(value) if vtype == gguf.GGUFValueType.BOOL else value

        if types[0] == gguf.GGUFValueType.ARRAY:
            out[key] = [scalar(i, types[-1]) for i in field.data] if len(types) > 1 else []
        else:
            out[key] = scalar(field.data[0], types[0])
    return out


# ------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _hf_chat_template(config: Mapping[str, Any], path: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default") or next(iter(named.values()), None)
    if not template and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    return template or None


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


__all__ = ["EOG_TOKEN_TEXTS", "StreamDecoder", "Tokenizer", "read_gguf_tokenizer_fields"]
