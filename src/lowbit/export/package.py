"""The packed format: ``model.safetensors`` (the numbers) + ``model.json`` (the manifest).

``model.safetensors`` holds exactly two tensors, so that its header stays ~150 bytes and the file
is at the physical limit even for a small network:

* ``codes`` (uint8): every quantized layer's weight codes, bit-packed at the layer's bits
  (:mod:`lowbit.export.pack`), one run per layer starting on a byte boundary;
* ``f32`` (float32): every full-precision number, concatenated: level sets (grid ``lo, step``
  per row, or value lists and scales), the per-channel affine of quantized layers (BN kept after the
  integer accumulator), folded weights and biases of full-precision layers.

(One safetensors tensor per layer would cost ~80 header bytes each: more than 2% of a 2-bit
ResNet-8.) ``model.json`` describes the graph in execution order: per op its kind, tensors,
shapes, conv geometry, and where its arrays are (``[offset, count]`` into ``f32``, ``[offset,
nbytes]`` into ``codes``), the weight quantizer (label, bits, level kind) and the activation
quantizer (rule and float32 constants, :class:`lowbit.export.levels.ActQuant`).

Size limit (issue 7): ``file bytes <= 1.02 * sum(params * bits) / 8 + 4 * (float32 numbers)``.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .graph import Graph, Op, WeightQ
from .levels import ActQuant, LevelSpec
from .pack import pack_codes, packed_nbytes, read_codes

FORMAT = "lowbit.packed"
VERSION = 1
#: the issue's allowance over the ideal packed size
LIMIT_FACTOR = 1.02


@dataclass
class Sizes:
    """Byte counts of a packed model (see :func:`sizes`)."""

    quantized_params: int  # number of quantized weights
    ideal_bits: int  # sum(params * bits)
    codes_bytes: int  # packed codes, with per-layer byte rounding
    float_count: int  # float32 numbers stored (scales, levels, affine, FP layers)
    fp32_params: int  # parameters of the float model (weights, biases, BN gamma/beta)
    file_bytes: int | None = None  # the .safetensors file, when written
    manifest_bytes: int | None = None

    @property
    def float_bytes(self) -> int:
        return 4 * self.float_count

    @property
    def limit_bytes(self) -> float:
        return LIMIT_FACTOR * self.ideal_bits / 8 + self.float_bytes

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.fp32_params

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("quantized_params", "ideal_bits", "codes_bytes", "float_count",
                                           "float_bytes", "limit_bytes", "fp32_params", "fp32_bytes",
                                           "file_bytes", "manifest_bytes")}
        d["ideal_bytes"] = self.ideal_bits / 8
        if self.file_bytes is not None:
            d["header_bytes"] = self.file_bytes - self.codes_bytes - self.float_bytes
            d["within_limit"] = bool(self.file_bytes <= self.limit_bytes)
            d["vs_fp32"] = self.fp32_bytes / self.file_bytes
        return d


def op_arrays(op: Op) -> dict[str, np.ndarray]:
    """The float32 arrays of an op, by name (what goes into the ``f32`` tensor)."""
    out: dict[str, np.ndarray] = {}
    if isinstance(op.weight, WeightQ):
        out.update({f"levels.{k}": v for k, v in op.weight.levels.arrays().items()})
    elif op.weight is not None:
        out["weight"] = op.weight
    for k in ("bias", "scale", "shift"):
        v = getattr(op, k)
        if v is not None:
            out[k] = v
    return out


def sizes(graph: Graph, fp32_params: int | None = None) -> Sizes:
    """Byte counts of ``graph`` packed (the file size is filled in by :func:`save_package`)."""
    qp = ideal = codes = floats = 0
    for op in graph.ops:
        if isinstance(op.weight, WeightQ):
            n = op.weight.codes.size
            qp += n
            ideal += n * op.weight.bits
            codes += packed_nbytes(n, op.weight.bits)
        floats += sum(a.size for a in op_arrays(op).values())
    return Sizes(qp, ideal, codes, floats, fp32_params if fp32_params is not None else 0)


def _f(v) -> list[int]:
    return list(v)


def digests(tensors: dict[str, np.ndarray]) -> dict[str, str]:
    """SHA-256 of every array's bytes: the manifest records them (``sha256``) and the loaders check them, so a
    changed byte in the numbers is an error, not different logits. Packages written before session 21 have none."""
    return {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in sorted(tensors.items())}


def check_digests(path: Path, tensors: dict[str, np.ndarray], manifest: dict) -> None:
    want = manifest.get("sha256")
    got = digests(tensors) if want is not None else want
    if got != want:
        bad = [k for k, h in got.items() if want.get(k) != h]
        raise ConfigError(f"{path}: the numbers do not match the manifest's checksums ({', '.join(bad)}): the file is "
                          "corrupt or was edited")


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed(manifest: dict) -> dict:
    """``manifest`` with ``manifest_sha256``, the SHA-256 of its own canonical JSON (without that key): with the
    numbers' digests inside it, a changed byte anywhere in the package is an error. Packages written before
    session 23 have none."""
    return {**manifest, "manifest_sha256": _manifest_digest(manifest)}


def check_manifest(path: Path, manifest: dict) -> None:
    want = manifest.get("manifest_sha256")
    if want is not None and want != _manifest_digest(manifest):
        raise ConfigError(f"{path}: the manifest does not match its checksum (manifest_sha256): the file is corrupt "
                          "or was edited")


@contextmanager
def reading(path: Path):
    """Turn what a truncated, corrupt or foreign package file raises while it is read into one line naming it."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, json and malformed manifests raise many types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: cannot read the package, the file is truncated or corrupt ({msg})") from None


def write_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' ``save_file``, whose error for a full disk or a read-only folder is its own type (a traceback
    before session 27): here an OSError naming the file, which the CLI prints in one line."""
    from safetensors.numpy import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:  # noqa: BLE001 - SafetensorError
        if "I/O error" not in str(e):
            raise
        msg = str(e).split("I/O error: ", 1)[-1].split(" at path ", 1)[0]
        raise OSError(5, f"could not be written ({msg}); is the disk full or the folder read-only?", str(path)) \
            from None


def save_package(graph: Graph, out_dir: str | Path, stem: str = "model",
                 fp32_params: int | None = None) -> Sizes:
    """Write ``{stem}.safetensors`` and ``{stem}.json`` into ``out_dir``; return the sizes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    code_runs: list[np.ndarray] = []
    float_runs: list[np.ndarray] = []
    n_codes = n_floats = 0
    ops_json = []
    for op in graph.ops:
        d: dict = {"kind": op.kind, "name": op.name, "inputs": op.inputs, "output": op.output,
                   "in_shape": _f(op.in_shape), "out_shape": _f(op.out_shape)}
        if op.attrs:
            d["attrs"] = op.attrs
        if op.bn:
            d["bn"] = {"folded": "folded into the float weights and bias",
                       "affine": "per-channel affine (scale, shift) after the integer accumulator"}[op.bn]
        if op.act is not None:
            d["act"] = op.act.to_dict()
        arrays = {}
        for k, v in op_arrays(op).items():
            v = np.ascontiguousarray(v, dtype=np.float32)
            arrays[k] = {"f32": [n_floats, int(v.size)], "shape": _f(v.shape)}
            float_runs.append(v.reshape(-1))
            n_floats += v.size
        if arrays:
            d["arrays"] = arrays
        if isinstance(op.weight, WeightQ):
            w = op.weight
            packed = pack_codes(w.codes, w.bits)
            d["weight"] = {"quantizer": w.quantizer, "bits": w.bits, "shape": _f(w.shape),
                           "codes": [n_codes, int(packed.size)],
                           "levels": {"kind": w.levels.kind, "rows": w.levels.rows, "n": w.levels.n}}
            code_runs.append(packed)
            n_codes += packed.size
        ops_json.append(d)
    tensors = {
        "codes": np.concatenate(code_runs) if code_runs else np.zeros(0, np.uint8),
        "f32": np.concatenate(float_runs).astype(np.float32) if float_runs else np.zeros(0, np.float32),
    }
    st = out / f"{stem}.safetensors"
    write_safetensors(tensors, st)
    manifest = {
        "format": FORMAT, "version": VERSION, "tensors": st.name,
        "input": {"name": graph.input, "shape": _f(graph.input_shape)},
        "output": {"name": graph.output, "shape": _f(graph.output_shape)},
        "meta": graph.meta, "ops": ops_json, "sha256": digests(tensors),
    }
    manifest = sealed(manifest)
    mf = out / f"{stem}.json"
    mf.write_text(json.dumps(manifest, indent=1) + "\n")
    s = sizes(graph, fp32_params)
    s.file_bytes, s.manifest_bytes = st.stat().st_size, mf.stat().st_size
    return s


def load_package(path: str | Path) -> Graph:
    """Load a packed model (the ``.json`` manifest, or the folder holding ``model.json``)."""
    from safetensors.numpy import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "model.json"
    if not p.is_file():
        raise ConfigError(f"no packed model manifest at {p}")
    with reading(p):
        m = json.loads(p.read_text())
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ConfigError(f"{p}: not a {FORMAT} v{VERSION} manifest")
    check_manifest(p, m)
    st = p.parent / str(m.get("tensors"))
    if not st.is_file():
        raise ConfigError(f"{p}: its numbers file {st.name} is missing")
    with reading(st):
        blobs = load_file(str(st))
    check_digests(st, blobs, m)
    with reading(p):
        return _graph_of(m, blobs, p)


def _graph_of(m: dict, blobs: dict, where: Path | str = "package") -> Graph:
    codes, f32 = blobs["codes"], blobs["f32"]
    ops = []
    for d in m["ops"]:
        arr = {k: f32[a["f32"][0]: a["f32"][0] + a["f32"][1]].reshape(a["shape"]).copy()
               for k, a in d.get("arrays", {}).items()}
        op = Op(d["kind"], d["name"], list(d["inputs"]), d["output"], tuple(d["in_shape"]), tuple(d["out_shape"]),
                attrs=d.get("attrs", {}), bias=arr.get("bias"), scale=arr.get("scale"), shift=arr.get("shift"),
                act=ActQuant.from_dict(d["act"]) if "act" in d else None)
        if "bn" in d:
            op.bn = "folded" if d["bn"].startswith("folded") else "affine"
        if "weight" in d:
            w = d["weight"]
            lv = w["levels"]
            spec = LevelSpec(lv["kind"], lv["rows"], lv["n"], **{k[len("levels."):]: v for k, v in arr.items()
                                                                 if k.startswith("levels.")})
            n = int(np.prod(w["shape"]))
            buf = codes[w["codes"][0]: w["codes"][0] + w["codes"][1]]
            c = read_codes(buf, w["bits"], n, int(lv["n"]), f"{where}: layer {d['name']}")
            c = c.reshape(w["shape"]).astype(np.uint8)
            op.weight = WeightQ(w["quantizer"], w["bits"], c, spec)
        elif "weight" in arr:
            op.weight = arr["weight"]
        ops.append(op)
    return Graph(ops, m["input"]["name"], m["output"]["name"], tuple(m["input"]["shape"]),
                 tuple(m["output"]["shape"]), meta=m.get("meta", {}))
