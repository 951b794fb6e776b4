"""What a client sends: its update as float32 arrays, or compressed (top-k and quantization, with error feedback).

A payload is a dict of numpy arrays (Flower's ArrayRecord holds one array per key), so its size in bytes is
what travels. Compression (as in CELLM / ComPEFT): each tensor of the update, plus what earlier rounds did
not send (the residual), is cut to its largest-magnitude entries (top_k < 1) and those are quantized; whatever
that loses is the new residual, added to the next update of the same tensor, so nothing is lost for good.
Positions travel as uint16 where a tensor has at most 65,536 entries (a LoRA factor of rank r on a model up to
4,096 wide), else int32. Values: float32; int8 / int16 scaled by the largest; or 2-7 bits packed, scaled to
CLIP_STDS standard deviations (larger entries are cut to that, the rest carried in the residual).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from expertkit.config import CompressionConfig

Payload = dict[str, np.ndarray]
Update = dict[str, torch.Tensor]

_INDEX, _VALUES, _SCALE = "::index", "::values", "::scale"
CLIP_STDS = 2.5  # packed low-bit values span ±CLIP_STDS standard deviations of the sent entries


def payload_bytes(payload: Payload) -> int:
    return int(sum(a.nbytes for a in payload.values()))


def plain_payload(update: Update) -> Payload:
    return {name: t.detach().float().cpu().numpy() for name, t in update.items()}


def _levels(bits: int) -> int:
    """Codes run from -levels to +levels."""
    return (1 << (bits - 1)) - 1


def _quantize(values: torch.Tensor, bits: int) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """(the arrays that carry `values` in `bits` bits, the values they decode to)."""
    if bits == 32:
        return {_VALUES: values.numpy()}, values
    levels = _levels(bits)
    if bits >= 8:
        scale = float(values.abs().max()) / levels or 1.0
    else:
        scale = CLIP_STDS * float(values.pow(2).mean().sqrt()) / levels or 1.0
    codes = torch.clamp(torch.round(values / scale), -levels, levels)
    if bits >= 8:
        arrays = {_VALUES: codes.numpy().astype(np.int8 if bits == 8 else np.int16)}
    else:  # offset to 0..2*levels, each code as `bits` bits, packed 8 to a byte
        unsigned = (codes + levels).numpy().astype(np.uint8)
        bit_matrix = np.unpackbits(unsigned[:, None], axis=1)[:, 8 - bits:]
        arrays = {_VALUES: np.packbits(bit_matrix.reshape(-1))}
    arrays[_SCALE] = np.array([scale], dtype=np.float32)
    return arrays, codes * scale


def _dequantize(payload: Payload, name: str, count: int, bits: int) -> torch.Tensor:
    values = np.asarray(payload[name + _VALUES])
    if bits < 8:
        bit_matrix = np.unpackbits(values)[: count * bits].reshape(count, bits)
        padded = np.concatenate([np.zeros((count, 8 - bits), dtype=np.uint8), bit_matrix], axis=1)
        values = np.packbits(padded, axis=1)[:, 0].astype(np.float32) - _levels(bits)
    out = torch.from_numpy(values.astype(np.float32))
    return out * float(payload[name + _SCALE][0]) if name + _SCALE in payload else out


def compress(update: Update, residual: Update, options: CompressionConfig) -> tuple[Payload, Update]:
    """The payload for `update` + `residual`, and the residual left for the next round."""
    payload, left = {}, {}
    for name, t in update.items():
        full = t.detach().float().cpu() + residual.get(name, torch.zeros_like(t, device="cpu"))
        flat = full.flatten()
        k = max(1, math.ceil(options.top_k * flat.numel()))
        index = None if k == flat.numel() else torch.topk(flat.abs(), k, sorted=False).indices
        arrays, sent = _quantize(flat if index is None else flat[index], options.bits)
        payload.update({name + key: array for key, array in arrays.items()})
        if index is not None:
            payload[name + _INDEX] = index.numpy().astype(np.uint16 if flat.numel() <= 1 << 16 else np.int32)
        dense = sent if index is None else torch.zeros_like(flat).index_put_((index,), sent)
        left[name] = (flat - dense).view_as(full)
    return payload, left


def decode(payload: Payload, shapes: dict[str, torch.Size], bits: int = 32) -> Update:
    """The update a payload stands for (plain, or compressed with `bits`), as float32 tensors of these shapes."""
    out = {}
    for name, shape in shapes.items():
        if name in payload:
            out[name] = torch.from_numpy(np.asarray(payload[name], dtype=np.float32)).view(shape)
            continue
        numel = math.prod(shape)
        if name + _INDEX not in payload:
            out[name] = _dequantize(payload, name, numel, bits).view(shape)
            continue
        index = torch.from_numpy(payload[name + _INDEX].astype(np.int64))
        dense = torch.zeros(numel)
        dense[index] = _dequantize(payload, name, len(index), bits)
        out[name] = dense.view(shape)
    return out
