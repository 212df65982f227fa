"""Textual inversion: new prompt tokens whose embeddings come from a small file.

``pipe.load_textual_inversion(...)`` adds the tokens to a tokenizer and their embedding rows to a text
encoder; a token trained with ``n`` vectors becomes ``tok``, ``tok_1``, ... ``tok_{n-1}``, and a prompt
naming ``tok`` is rewritten to name all of them before tokenising (:func:`convert_prompt`, the
reference's ``maybe_convert_prompt``).

The text encoder's embedding matrix is left as it is (SDXL's second one is 49408 x 1280; resizing would
copy it and change the model's ``state_dict``). Instead:

- the new rows live in a side table, the buffers of a bank module registered on the text encoder as
  ``diffpipe_textual_inversion``. The buffers are non-persistent, so ``state_dict()``, saving and
  ``load_state_dict`` see exactly the base model, while ``.to()`` moves and casts the table with it;
- a hook on the input-embedding module (``text_encoder.get_input_embeddings()``) looks the table's ids
  up there: ids past the matrix go to the embedding as 0 and their output rows are replaced by the
  table's. So ``get_input_embeddings()(ids)`` gives the new rows too, and the token ids themselves are
  the reference's (its pooled output finds the end token by id, which new ids take part in).

``unload_textual_inversion`` takes tokens out of the tokenizer (rebuilding its backend without them, the
later added tokens renumbered to close the gap, as the reference does) and their rows out of the table;
the last row going removes the hook and the bank, leaving the text encoder as it was.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import logging
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError, summarize
from ..runtime.hooks import ModuleHook, add_hook, get_hook, remove_hook

logger = logging.getLogger(__name__)

BANK = "diffpipe_textual_inversion"
_HOOK = "textual_inversion"
WEIGHT_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_PAIR = ("clip_l", "clip_g")  # SDXL embeddings: one per text encoder


# ------------------------------------------------------------------------------------- the side table
class EmbeddingBank(nn.Module):
    """Token ids (sorted) and their embedding rows, as non-persistent buffers (never in state_dict)."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("ids", torch.zeros(0, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("rows", torch.zeros(0, width, dtype=dtype, device=device), persistent=False)

    def table(self) -> dict[int, torch.Tensor]:
        return {int(i): row for i, row in zip(self.ids.tolist(), self.rows)}

    def set_table(self, table: dict[int, torch.Tensor]) -> None:
        ids = sorted(table)
        self.ids = torch.tensor(ids, dtype=torch.long, device=self.ids.device)
        if ids:
            self.rows = torch.stack([table[i].to(self.rows) for i in ids])
        else:
            self.rows = self.rows[:0]


class TokenRows(ModuleHook):
    """On a text encoder's input embedding: rows of the bank's ids come from the bank."""

    def __init__(self, model: nn.Module, embedding: nn.Module):
        self.model = model
        self.bank = EmbeddingBank(embedding.weight.shape[1], embedding.weight.dtype, embedding.weight.device)
        model.add_module(BANK, self.bank)
        self._pending: list = []  # (ids, mask) of the calls in flight, from pre_ to post_forward

    def on_remove(self, module: nn.Module) -> None:
        self.model._modules.pop(BANK, None)

    def pre_forward(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input"]
        bank = self.bank
        if bank.ids.device != ids.device:  # moved apart (offload of single modules)
            bank.to(ids.device)
        mask = torch.isin(ids, bank.ids)
        self._pending.append((ids, mask))
        safe = ids.masked_fill(mask, 0)
        if args:
            return (safe, *args[1:]), kwargs
        return args, {**kwargs, "input": safe}

    def post_forward(self, module, args, kwargs, output):
        ids, mask = self._pending.pop()
        bank = self.bank
        if not bool(mask.any()):
            return output
        where = torch.searchsorted(bank.ids, ids.clamp(min=0)).clamp(max=bank.ids.numel() - 1)
        rows = bank.rows[where].to(device=output.device, dtype=output.dtype)
        return torch.where(mask.unsqueeze(-1), rows, output)


def embedding_of(text_encoder: nn.Module) -> nn.Module:
    embedding = text_encoder.get_input_embeddings()
    if not isinstance(getattr(embedding, "weight", None), torch.Tensor) or embedding.weight.ndim != 2:
        raise TypeError(f"{type(text_encoder).__name__}: its input embedding has no [vocab, width] weight")
    return embedding


def rows_of(text_encoder: nn.Module) -> TokenRows | None:
    return get_hook(embedding_of(text_encoder), _HOOK)


# ------------------------------------------------------------------------------------- prompts
def convert_prompt(prompt, tokenizer):
    """The prompt (or list of prompts) with each multi-vector token ``tok`` of ``tokenizer`` written as
    ``tok tok_1 ... tok_{n-1}``: the reference's ``maybe_convert_prompt``. Like it, the token is found
    by the tokenizer and replaced as plain text, everywhere in the prompt."""
    if tokenizer is None:
        return prompt
    if isinstance(prompt, (list, tuple)):
        return [_convert_one(p, tokenizer) for p in prompt]
    return _convert_one(prompt, tokenizer)


def _convert_one(prompt, tokenizer):
    if not isinstance(prompt, str) or not prompt:
        return prompt
    added = tokenizer.added_tokens_encoder
    if not any(name.endswith("_1") for name in added):
        return prompt  # no multi-vector token: nothing to expand
    for token in dict.fromkeys(tokenizer.tokenize(prompt)):
        if token not in added:
            continue
        replacement, i = token, 1
        while f"{token}_{i}" in added:
            replacement += f" {token}_{i}"
            i += 1
        prompt = prompt.replace(token, replacement)
    return prompt


_CONVERTING = contextvars.ContextVar("diffpipe_ti_converting", default=False)


def _converting_sd(encode_prompt):
    """SD's ``encode_prompt`` with ``prompt`` / ``negative_prompt`` converted for ``self.tokenizer``."""
    signature = inspect.signature(encode_prompt)

    @functools.wraps(encode_prompt)
    def wrapper(self, *args, **kwargs):
        if _CONVERTING.get():
            return encode_prompt(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        tokenizer = getattr(self, "tokenizer", None)
        for name in ("prompt", "negative_prompt"):
            if name in bound.arguments:
                bound.arguments[name] = convert_prompt(bound.arguments[name], tokenizer)
        mark = _CONVERTING.set(True)
        try:
            return encode_prompt(*bound.args, **bound.kwargs)
        finally:
            _CONVERTING.reset(mark)

    return wrapper


def _converting_stack(encode_texts):
    """SDXL's ``_encode_texts(stack, texts_per_encoder, ...)`` with each encoder's texts converted for
    its own tokenizer, as the reference converts per tokenizer."""

    @functools.wraps(encode_texts)
    def wrapper(stack, texts_per_encoder, *args, **kwargs):
        texts = [convert_prompt(t, tok) for (tok, _), t in zip(stack, texts_per_encoder)]
        return encode_texts(stack, texts, *args, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------------- reading files
def _load_pt(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path} was refused: it is a pickle that needs more than tensors, numbers and strings to load (it "
            "may carry code), and diffpipe loads pickles only with weights_only=True. Convert the embedding to "
            f"safetensors in a trusted environment. Detail: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path} could not be read as a PyTorch file: {e}") from e


def read_file(path: Path):
    if not path.is_file():
        raise CheckpointNotFoundError(f"textual inversion: no file {path}")
    if path.name.endswith(".safetensors"):
        from ..io.state_dict import load_safetensors

        try:
            return dict(load_safetensors(path))
        except CheckpointNotFoundError:
            raise
        except Exception as e:
            raise CorruptCheckpointError(f"{path} could not be read as a safetensors file: {e}") from e
    return _load_pt(path)


def locate(source, *, weight_name, subfolder, use_safetensors, cache_dir, local_files_only, hf_token, revision):
    """(path, label) of the embedding file of a file path, folder or Hub repo id."""
    from .. import hub
    from ..io.files import check_plain_name, check_relative_path

    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.is_file():
        return path, name
    if weight_name is not None:
        check_plain_name(weight_name, "weight_name")
    if name.endswith(_SUFFIXES) and not path.exists() and (path.parent.is_dir() or os.sep in name):
        raise CheckpointNotFoundError(f"textual inversion: no file {name}")
    prefix = check_relative_path(subfolder, "subfolder") + "/" if subfolder not in (None, "", ".") else ""
    label = name + (f"/{subfolder}" if prefix else "")
    chosen: list[str] = []

    def select(files, read):
        here = sorted(f[len(prefix) :] for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :])
        if weight_name is not None:
            candidates = [weight_name]
        else:
            candidates = {True: WEIGHT_NAMES[:1], False: WEIGHT_NAMES[1:]}.get(use_safetensors, WEIGHT_NAMES)
        for candidate in candidates:
            if candidate in here:
                chosen.append(prefix + candidate)
                return [prefix + candidate]
        weights = [f for f in here if f.endswith(_SUFFIXES)]
        raise CheckpointNotFoundError(
            f"textual inversion: {label} has no {' or '.join(candidates)}; weight files there: "
            f"{summarize(weights)}" + ("; pick one with weight_name=" if weights else "")
        )

    root = hub.fetch(
        name,
        select,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=hf_token,
        what=f"textual inversion {label}",
    )
    return root / chosen[-1], f"{label}/{chosen[-1].rsplit('/', 1)[-1]}"


def parse(state, token: str | None, width: int, which: str | None, label: str) -> tuple[str, torch.Tensor]:
    """(token, [n, width] vectors) of one embedding: a tensor, a diffusers ``{token: tensor}``, A1111's
    ``string_to_param`` (.pt) / ``emb_params`` (.safetensors), or an SDXL ``clip_l`` + ``clip_g`` pair
    (the one for this encoder: ``which``, else the one of its width)."""
    if torch.is_tensor(state):
        if token is None:
            raise ValueError(f"textual inversion: {label} is a bare tensor; name its token with token=")
        vectors = state
    elif not isinstance(state, dict):
        raise ValueError(f"textual inversion: {label} is a {type(state).__name__}, not an embedding")
    elif "string_to_param" in state:
        params = state["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1 or not torch.is_tensor(next(iter(params.values()))):
            raise ValueError(f"textual inversion: {label}: string_to_param should map one name to a tensor")
        vectors = next(iter(params.values()))
        name = state.get("name")
        token = token if token is not None else name if isinstance(name, str) and name else None
        if token is None:
            raise ValueError(f"textual inversion: {label} names no token (no 'name'); pass token=")
    elif "emb_params" in state and torch.is_tensor(state["emb_params"]):
        vectors = state["emb_params"]
        token = "emb_params" if token is None else token  # the reference's default: the key
    elif set(_PAIR) <= set(state) and all(torch.is_tensor(state[k]) for k in _PAIR):
        key = which
        if key is None:
            fits = [k for k in _PAIR if state[k].shape[-1] == width]
            key = fits[0] if len(fits) == 1 else None
        if key is None:
            raise ValueError(
                f"textual inversion: {label} is an SDXL embedding (clip_l {tuple(state['clip_l'].shape)}, clip_g "
                f"{tuple(state['clip_g'].shape)}) and none or both fit a text encoder of width {width}; load it "
                "into each encoder with text_encoder=/tokenizer="
            )
        if token is None:
            raise ValueError(f"textual inversion: {label} is an SDXL embedding pair; name its token with token=")
        vectors = state[key]
    elif len(state) == 1 and torch.is_tensor(next(iter(state.values()))):
        key, vectors = next(iter(state.items()))
        token = key if token is None else token
    else:
        shown = {k: (tuple(v.shape) if torch.is_tensor(v) else type(v).__name__) for k, v in list(state.items())[:6]}
        raise ValueError(
            f"textual inversion: {label} is not a textual-inversion embedding: expected one {{token: tensor}} "
            f"entry, A1111's 'string_to_param' / 'emb_params', or SDXL's 'clip_l' + 'clip_g'; it holds {shown}"
        )
    if not isinstance(token, str) or not token:
        raise ValueError(f"textual inversion: a token is a non-empty string, got {token!r} ({label})")
    if not vectors.is_floating_point() or vectors.ndim not in (1, 2) or vectors.shape[-1] != width:
        raise ValueError(
            f"textual inversion: {label} has embeddings of shape {tuple(vectors.shape)} but the text encoder "
            f"takes vectors of width {width} (one [width] or [n, width] tensor); the embedding was trained for "
            "another model"
        )
    return token, vectors.detach().reshape(-1, width)


# ------------------------------------------------------------------------------------- tokenizer edits
def _backend(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise TypeError(
            f"textual inversion: {type(tokenizer).__name__} has no `tokenizers` backend; diffpipe removes tokens "
            "from tokenizers-backed (fast) tokenizers only"
        )
    return backend


def remove_tokens(tokenizer, names: list[str]) -> dict[int, int]:
    """Drop the added tokens ``names`` from ``tokenizer`` and renumber the added tokens after the first
    removed id to close the gap; returns ``{old id: new id}`` of every added token that moved or stayed
    (the removed ones are absent)."""
    from tokenizers import Tokenizer

    backend = _backend(tokenizer)
    data = json.loads(backend.to_str())
    gone = {e["id"] for e in data["added_tokens"] if e["content"] in names}
    start = min(gone)
    kept, mapping, next_id = [], {}, start
    for entry in sorted(data["added_tokens"], key=lambda e: e["id"]):
        if entry["id"] in gone:
            continue
        if entry["id"] > start:
            mapping[entry["id"]], entry["id"] = next_id, next_id
            next_id += 1
        else:
            mapping[entry["id"]] = entry["id"]
        kept.append(entry)
    data["added_tokens"] = kept
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
    return mapping


# ------------------------------------------------------------------------------------- pipeline methods
class TextualInversionLoaderMixin:
    """``load_textual_inversion`` / ``unload_textual_inversion`` / ``maybe_convert_prompt`` for pipelines
    with ``tokenizer`` + ``text_encoder`` (and SDXL's ``tokenizer_2`` + ``text_encoder_2``).

    The pipelines' prompt encoding converts prompts for textual-inversion tokens: a subclass's own
    ``encode_prompt`` (SD) or ``_encode_texts`` (SDXL: per tokenizer) is wrapped when the class is made.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if isinstance(own.get("_encode_texts"), staticmethod):
            cls._encode_texts = staticmethod(_converting_stack(own["_encode_texts"].__func__))
        elif callable(own.get("encode_prompt")) and getattr(cls, "_encode_texts", None) is None:
            cls.encode_prompt = _converting_sd(own["encode_prompt"])

    def maybe_convert_prompt(self, prompt, tokenizer):
        """``prompt`` with each multi-vector token expanded to all its vectors' tokens (``tok`` ->
        ``tok tok_1 ...``); a list gives a list."""
        return convert_prompt(prompt, tokenizer)

    def _maybe_convert_prompt(self, prompt, tokenizer):
        return convert_prompt(prompt, tokenizer)

    def _textual_inversion_pair(self, tokenizer, text_encoder, what: str):
        tokenizer = tokenizer if tokenizer is not None else getattr(self, "tokenizer", None)
        text_encoder = text_encoder if text_encoder is not None else getattr(self, "text_encoder", None)
        if tokenizer is None or text_encoder is None:
            raise ValueError(
                f"{what}: {type(self).__name__} has no {'tokenizer' if tokenizer is None else 'text_encoder'}; pass "
                "tokenizer= and text_encoder= (for SDXL's second encoder: pipe.tokenizer_2, pipe.text_encoder_2)"
            )
        return tokenizer, text_encoder

    def load_textual_inversion(
        self,
        pretrained_model_name_or_path,
        token: str | list[str] | None = None,
        tokenizer=None,
        text_encoder=None,
        *,
        weight_name: str | None = None,
        subfolder: str | None = None,
        use_safetensors: bool | None = None,
        cache_dir=None,
        local_files_only: bool | None = None,
        hf_token=None,
        revision: str | None = None,
        **kwargs,
    ) -> None:
        """Add textual-inversion tokens and their embeddings.

        ``pretrained_model_name_or_path``: a file, a folder or Hub repo (``learned_embeds.safetensors``
        / ``.bin``, or ``weight_name``), a state dict, a tensor, or a list of these (with a list of
        ``token`` of the same length). ``token`` names the token (default: the file's). ``tokenizer`` /
        ``text_encoder`` default to the pipeline's first ones; SDXL embeddings (``clip_l`` + ``clip_g``)
        load once per encoder, e.g. ``load_textual_inversion(path, token="<t>", tokenizer=pipe.tokenizer_2,
        text_encoder=pipe.text_encoder_2)``. On an SDXL pipeline, a ``clip_l`` + ``clip_g`` file given
        without ``tokenizer``/``text_encoder`` loads into both encoders (the reference refuses it).
        Everything is checked before the tokenizer or the text encoder changes.
        """
        from .source import check_kwargs

        check_kwargs(kwargs, "load_textual_inversion")
        fetch = dict(
            weight_name=weight_name,
            subfolder=subfolder,
            use_safetensors=use_safetensors,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            hf_token=hf_token,
            revision=revision,
        )
        sources = list(pretrained_model_name_or_path) if isinstance(pretrained_model_name_or_path, list) else None
        if sources is None:
            sources = [pretrained_model_name_or_path]
            tokens = list(token) if isinstance(token, (list, tuple)) else [token]
        else:
            tokens = list(token) if isinstance(token, (list, tuple)) else [token] * len(sources)
        if len(tokens) != len(sources):
            raise ValueError(
                f"load_textual_inversion: {len(sources)} embedding(s) but {len(tokens)} token(s); pass one token "
                "per embedding"
            )
        named = [t for t in tokens if t is not None]
        if len(set(named)) != len(named):
            raise ValueError(f"load_textual_inversion: the tokens repeat: {named}")
        states = []
        for source in sources:
            if isinstance(source, dict) or torch.is_tensor(source):
                states.append((source, "the given " + ("state dict" if isinstance(source, dict) else "tensor")))
            elif isinstance(source, (str, os.PathLike)):
                path, label = locate(source, **fetch)
                states.append((read_file(path), label))
            else:
                raise TypeError(
                    "load_textual_inversion takes a path, repo id, state dict or tensor (or a list of them), "
                    f"not {type(source).__name__}"
                )
        pairs = [(tokenizer, text_encoder, None)]
        text_encoder_2 = getattr(self, "text_encoder_2", None)
        if tokenizer is None and text_encoder is None and text_encoder_2 is not None:
            pair_files = [isinstance(s, dict) and set(_PAIR) <= set(s) for s, _ in states]
            if all(pair_files):
                pairs = [(None, None, "clip_l"), (getattr(self, "tokenizer_2", None), text_encoder_2, "clip_g")]
                if getattr(self, "text_encoder", None) is None:  # a refiner: the second encoder only
                    pairs = pairs[1:]
        plans = []
        for tok, enc, which in pairs:
            tok, enc = self._textual_inversion_pair(tok, enc, "load_textual_inversion")
            if which is None and enc is not None:  # an SDXL pair's half for this encoder, if it is the pipeline's
                which = {id(getattr(self, "text_encoder", None)): "clip_l", id(text_encoder_2): "clip_g"}.get(id(enc))
            plans.append((tok, enc, _plan(tok, enc, states, tokens, which)))
        for tok, enc, plan in plans:
            _add(tok, enc, plan)

    def unload_textual_inversion(self, tokens: str | list[str] | None = None, tokenizer=None, text_encoder=None):
        """Remove textual-inversion tokens (all of them by default; a name removes exactly that token, as
        in the reference: ``tok_1`` ... stay unless named) from the tokenizer and their rows from the text
        encoder. The later added tokens are renumbered, as the reference does; with every token gone the
        tokenizer and the text encoder are as they were before loading."""
        tokenizer, text_encoder = self._textual_inversion_pair(tokenizer, text_encoder, "unload_textual_inversion")
        embedding = embedding_of(text_encoder)
        hook: TokenRows | None = get_hook(embedding, _HOOK)
        held = set(hook.bank.ids.tolist()) if hook is not None else set()
        size = embedding.weight.shape[0]
        added = {
            t.content: i
            for i, t in tokenizer.added_tokens_decoder.items()
            if not t.special and (i in held or i >= size)
        }
        if tokens is None:
            names = list(added)
        else:
            wanted = [tokens] if isinstance(tokens, str) else list(tokens)
            names = [n for n in wanted if n in added]
            unknown = [n for n in wanted if n not in added]
            if unknown and names:
                logger.warning("unload_textual_inversion: not textual-inversion tokens, left alone: %s", unknown)
        if not names:
            raise ValueError(
                "unload_textual_inversion: no tokens to remove found"
                + (f" ({summarize(tokens if isinstance(tokens, list) else [tokens])} are not loaded)" if tokens else "")
                + f"; loaded: {summarize(sorted(added, key=added.get))}"
            )
        mapping = remove_tokens(tokenizer, names)
        if hook is None:
            return
        removed = {added[n] for n in names}
        moved = {mapping.get(i, i): row for i, row in hook.bank.table().items() if i not in removed}
        if moved:
            hook.bank.set_table(moved)
        else:
            remove_hook(embedding, _HOOK)


def _plan(tokenizer, text_encoder, states, tokens, which) -> list[tuple[str, torch.Tensor]]:
    """[(token name, row)] for one tokenizer/encoder, checked against both and each other."""
    width = embedding_of(text_encoder).weight.shape[1]
    vocab = tokenizer.get_vocab()
    plan, seen = [], {}
    for (state, label), token in zip(states, tokens):
        name, vectors = parse(state, token, width, which, label)
        names = [name] + [f"{name}_{i}" for i in range(1, vectors.shape[0])]
        taken = [n for n in names if n in vocab]
        if taken:
            raise ValueError(
                f"load_textual_inversion: token {taken[0]!r} ({label}) is already in the tokenizer's vocabulary; "
                f"choose another token= or unload_textual_inversion({taken[0]!r}) first"
            )
        clash = [n for n in names if n in seen]
        if clash:
            raise ValueError(
                f"load_textual_inversion: token {clash[0]!r} comes from both {seen[clash[0]]} and {label}; "
                "name them apart with token=[...]"
            )
        seen.update(dict.fromkeys(names, label))
        plan.extend(zip(names, vectors))
    return plan


def _add(tokenizer, text_encoder, plan: list[tuple[str, torch.Tensor]]) -> None:
    names = [name for name, _ in plan]
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    embedding = embedding_of(text_encoder)
    hook: TokenRows = get_hook(embedding, _HOOK) or add_hook(embedding, _HOOK, TokenRows(text_encoder, embedding))
    table = hook.bank.table()
    table.update({i: row.to(hook.bank.rows) for i, (_, row) in zip(ids, plan)})
    hook.bank.set_table(table)
