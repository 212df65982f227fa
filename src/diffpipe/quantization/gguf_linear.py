"""GGUF-quantized linear layers, and building a model from a GGUF file.

A :class:`GGUFLinear` keeps its weight as the file's quantized bytes (a ``uint8`` parameter, shape
``(out_features, bytes per row)``) and dequantizes it to ``compute_dtype`` in each forward, so the
model's memory stays near the file's size. Only the weights of plain ``nn.Linear`` layers stay
quantized; every other tensor (norms, biases, convolutions, embeddings) is dequantized when loaded.

``state_dict()`` of a GGUF model returns the dequantized weights (in ``compute_dtype``), so
``save_pretrained`` writes an ordinary model; loading a state dict into a GGUF layer is refused.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..io.load_model import assign_weights
from ..nn.construction import empty_modules
from .gguf_kernels import check_supported, dequantize, is_quantized, type_name, value_shape
from .gguf_reader import GGUFTensor, open_gguf

logger = logging.getLogger(__name__)


class GGUFWeight(torch.Tensor):
    """Quantized bytes (``uint8``, rows of whole blocks) that know their GGML type.

    What a ``key_map`` callable receives for a quantized tensor: row-wise operations (slicing,
    ``torch.chunk`` / ``split`` / ``cat`` along dim 0, ``reshape`` of the leading dimensions) keep the
    type; anything producing another dtype returns a plain tensor. ``quant_shape`` is the values' shape.
    """

    quant_type: int

    @staticmethod
    def __new__(cls, raw: torch.Tensor, quant_type: int):
        out = raw.as_subclass(cls)
        out.quant_type = quant_type
        return out

    @property
    def quant_shape(self) -> tuple[int, ...]:
        return value_shape(tuple(self.shape), self.quant_type)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.as_subclass(torch.Tensor), self.quant_type, dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        qtype = _first_type(args) if _first_type(kwargs.values()) is None else _first_type(kwargs.values())
        return _rewrap(result, qtype)

    def __repr__(self, **kwargs):
        return f"GGUFWeight({type_name(self.quant_type)}, values {list(self.quant_shape)}, bytes {list(self.shape)})"


def _first_type(values):
    for v in values:
        if isinstance(v, GGUFWeight):
            return v.quant_type
        if isinstance(v, (list, tuple)):
            found = _first_type(v)
            if found is not None:
                return found
    return None


def _rewrap(result, qtype):
    if isinstance(result, torch.Tensor) and not isinstance(result, nn.Parameter):
        if result.dtype == torch.uint8 and result.dim() > 0 and qtype is not None:
            return GGUFWeight(result.as_subclass(torch.Tensor), qtype)
        return result.as_subclass(torch.Tensor) if isinstance(result, GGUFWeight) else result
    if isinstance(result, (list, tuple)):
        return type(result)(_rewrap(r, qtype) for r in result)
    return result


class GGUFLinear(nn.Linear):
    """``nn.Linear`` whose weight is GGUF-quantized bytes, dequantized to ``compute_dtype`` in forward
    (the input is cast to it, the output back to the input's dtype)."""

    def __init__(self, raw: torch.Tensor, quant_type: int, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight
        self.quant_type = int(quant_type)
        self.out_features, self.in_features = value_shape(tuple(raw.shape), self.quant_type)
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(raw.as_subclass(torch.Tensor), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, raw: torch.Tensor, quant_type: int, compute_dtype: torch.dtype):
        new = cls(raw, quant_type, linear.bias, compute_dtype)
        new.train(linear.training)
        return new

    @property
    def quant_type_name(self) -> str:
        return type_name(self.quant_type)

    @property
    def quantized_bytes(self) -> int:
        return self.weight.numel()

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.weight.detach(), self.quant_type, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        weight = self.dequantized_weight(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), weight, bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type_name}, compute_dtype={self.compute_dtype}"
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dequantized_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        if any(k.startswith(prefix) for k in state_dict):
            errors.append(
                f"{prefix}weight is GGUF-quantized ({self.quant_type_name}); loading a state dict into it is not "
                "supported. Load the GGUF file again, or load the model without quantization to change its weights"
            )


def quantized_bytes(model: nn.Module) -> int:
    """The bytes the model's quantized weights hold."""
    return sum(m.quantized_bytes for m in model.modules() if isinstance(m, GGUFLinear))


# ------------------------------------------------------------------------------------------ loading
def _mapped(tensors: dict[str, GGUFTensor], key_map) -> dict[str, torch.Tensor]:
    """The file's tensors under the model's names: quantized ones as :class:`GGUFWeight`, plain ones
    as tensors of their own dtype (views of the file)."""
    state: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        check_supported(t.qtype, name)
        if is_quantized(t.qtype):
            state[name] = GGUFWeight(t.raw, t.qtype)
        else:
            state[name] = t.dequantize()
    if key_map is None:
        return state
    if callable(key_map):
        out = key_map(state)
        if isinstance(out, tuple):  # (state, unmapped names) as the key converters return
            out, unmapped = out
            if unmapped:
                logger.warning("GGUF: %d tensor(s) map to nothing: %s", len(unmapped), ", ".join(list(unmapped)[:5]))
        return dict(out)
    return {key_map.get(k, k): v for k, v in state.items()}


def _placeholder(shape, dtype) -> torch.Tensor:
    """A tensor of ``shape`` that holds one element (checked and assigned, then replaced)."""
    return torch.zeros((), dtype=dtype).expand(shape)


def load_gguf_into(
    model_cls,
    path: str | os.PathLike,
    config: dict,
    compute_dtype: torch.dtype | None = None,
    key_map=None,
    *,
    torch_dtype: torch.dtype | str | None = None,
    where: str | None = None,
    overrides: dict | None = None,
    modules_to_not_convert: list[str] | None = None,
):
    """``model_cls`` built from ``config`` with the weights of the GGUF file at ``path``.

    The model is built on the meta device; the file's tensor names are mapped through ``key_map``
    (``None``: the file uses the model's names; a dict ``{file name: model name}``; or a callable
    ``state -> state`` or ``state -> (state, unmapped)`` given quantized tensors as
    :class:`GGUFWeight`); the weights of plain ``nn.Linear`` layers stay quantized
    (:class:`GGUFLinear`, dequantized to ``compute_dtype`` in forward); every other tensor is
    dequantized to ``torch_dtype`` (default: ``compute_dtype``). Keys and shapes are checked as
    ``from_pretrained`` checks them. Linear layers named in ``modules_to_not_convert`` (or under
    them) are dequantized at load too.
    """
    compute_dtype = compute_dtype or torch.float32
    target = compute_dtype if torch_dtype is None else torch_dtype
    file = open_gguf(path)
    where = where or f"{model_cls.__name__} from {file.path}"
    state = _mapped(file.tensors, key_map)
    config = {k: v for k, v in dict(config).items() if k != "_class_name"}
    with empty_modules():
        model = model_cls.from_config(config, **(overrides or {}))
    modules = dict(model.named_modules())
    keep: dict[str, torch.Tensor] = {}  # linear weight key -> its quantized bytes
    plain: dict[str, torch.Tensor] = {}
    dtype = torch.get_default_dtype() if target == "auto" else target
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        if isinstance(value, GGUFWeight):
            module = modules.get(owner)
            if leaf == "weight" and type(module) is nn.Linear and not _excluded(owner, modules_to_not_convert):
                keep[key] = value.as_subclass(torch.Tensor)
                plain[key] = _placeholder(value.quant_shape, dtype)  # checked now, replaced below
                continue
            value = value.dequantize(dtype).reshape(_file_shape(value, key, file))
        plain[key] = value
    origin = dict.fromkeys(plain, str(file.path))
    assign_weights(model, plain, source=origin, where=where, dtype=target, allow_missing=False)
    for key, raw in keep.items():
        owner, _, _ = key.rpartition(".")
        parent_name, _, child = owner.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        quant_type = state[key].quant_type
        setattr(parent, child, GGUFLinear.from_linear(linear, raw, quant_type, compute_dtype))
    model.eval()
    logger.debug("%s: %d quantized linear layer(s), types %s", where, len(keep), file.types)
    return model


def _excluded(name: str, patterns) -> bool:
    return any(name == p or name.startswith(p + ".") or name.endswith("." + p) for p in patterns or ())


def _file_shape(value: GGUFWeight, key: str, file) -> tuple[int, ...]:
    """A quantized tensor's values' shape: the file's (a convolution's 4 dimensions) when the name is
    the file's own, else the rows' shape."""
    t = file.tensors.get(key)
    if t is not None and t.raw.shape == value.shape:
        return t.shape
    return value.quant_shape


def load_single_file_gguf(cls, path, quantization, config, subfolder, dtype, hub: dict, overrides: dict, where: str):
    """``cls.from_single_file(path.gguf, quantization_config=..., config=...)`` (the hook in
    ``single_file.build.load_model``). The model's config comes from ``config=`` (a model folder or
    repo, with ``subfolder=``, or a pipeline folder whose subfolder is found by the class), else from
    the class's ``_gguf_single_file(file) -> (config, key_map)`` when it has one (for files in an
    original layout); else the error says to pass ``config=``."""
    from . import GGUFQuantizationConfig

    if quantization is None:
        quantization = GGUFQuantizationConfig(compute_dtype=dtype if isinstance(dtype, torch.dtype) else None)
    if not isinstance(quantization, GGUFQuantizationConfig):
        raise ConfigError(
            f"{where}: quantization_config {type(quantization).__name__} is not supported; single files take "
            "GGUFQuantizationConfig (for .gguf files)"
        )
    # an original layout's config (read from the shapes) and key map, when the class knows that layout
    own_config, key_map = cls._gguf_single_file(open_gguf(path)) if hasattr(cls, "_gguf_single_file") else (None, None)
    if config is not None:
        model_config = dict(cls.load_config(config, subfolder=subfolder, **hub))
    elif own_config is not None:
        model_config = own_config
    else:
        raise ConfigError(
            f"{where}: a GGUF file holds no config; pass config= a diffusers folder or Hub repo id of the same "
            f"model (with subfolder= for a pipeline's component, e.g. subfolder='unet')"
        )
    return load_gguf_into(
        cls,
        path,
        model_config,
        quantization.compute_dtype,
        key_map,
        torch_dtype=dtype,
        where=where,
        overrides=overrides,
        modules_to_not_convert=quantization.modules_to_not_convert,
    )


__all__ = ["GGUFLinear", "GGUFWeight", "load_gguf_into", "quantized_bytes"]
