"""Putting a model on the chip block by block, in memory bounded by the deployed model plus one block.

Loading a model whole and then calling :func:`analogllm.deploy_` needs the complete digital model in
memory (on the GPU, for a GPU run) before the first chip is programmed. Here the model is built on the
meta device, the parts outside the decoder blocks (embeddings, final norm, LM head) are read from the
checkpoint's safetensors files, and then each decoder block in turn is read, mapped onto the chip,
programmed and deployed (its digital weights freed) before the next is read. With calibration text a
first pass runs that text through the model in the same way (each block read just before its forward
and dropped after it) to capture every analogue layer's inputs.

The result is the model that loading it whole, :func:`analogllm.analogize_` with the same calibration
and :func:`analogllm.deploy_` give, chip for chip: every mapping step reads and writes one block only
(the residual rotation is applied outside the blocks once and to each block as it is read), and a chip
is a function of (weights, seed, module name, time).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from analogllm.config import AnalogConfig
from analogllm.nn.matrix import AnalogMatrix

#: safetensors dtype names
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class Checkpoint:
    """The tensors of a Hugging Face checkpoint folder's safetensors files (one file or an indexed set
    of shards), read one at a time straight into memory of their own. No memory map is kept open: a
    mapped file's pages stay resident (and counted) as long as the map lives, and a tensor viewing them
    would alias the file, so writing to one weight would change the next read of it."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            files = sorted({self.folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        elif single.is_file():
            files = [single]
        else:
            raise FileNotFoundError(
                f"{self.folder}: no model.safetensors or model.safetensors.index.json; streaming reads a model "
                "saved with save_pretrained (safetensors). Load other formats whole (analogllm.hf.models.load_model).")
        self.entries: dict[str, tuple[Path, int, dict]] = {}
        for path in files:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            for key, info in header.items():
                self.entries[key] = (path, 8 + size, info)

    def get(self, key: str) -> torch.Tensor:
        path, base, info = self.entries[key]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which streaming cannot read")
        start, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
        view = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        if view is not None:
            if view.nbytes != end - start:
                raise ValueError(f"{path}: tensor {key!r} holds {end - start} bytes, its shape needs {view.nbytes}")
            with open(path, "rb") as f:
                f.seek(base + start)
                if f.readinto(memoryview(view)) != view.nbytes:
                    raise ValueError(f"{path}: the file ends inside tensor {key!r}; it is truncated")
        return out


def _checkpoint_key(name: str) -> str:
    """The checkpoint name of a parameter: a parametrized weight (``x.parametrizations.weight.original``,
    weight-side analogue layers) is saved under its plain name ``x.weight``."""
    return name.replace(".parametrizations.", ".").removesuffix(".original")


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, modules) of the model's decoder blocks: its longest ``nn.ModuleList``."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of decoder blocks to load block by block")
    return max(lists, key=lambda nm: len(nm[1]))


class _Reader:
    """Materialises meta parameters from a :class:`Checkpoint` onto ``device`` in ``dtype``; tied
    parameters (one Parameter in two modules) stay one."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
        self.ckpt, self.device, self.dtype = ckpt, device, dtype
        #: id of a meta parameter → (that parameter, what was read for it); holding the meta parameter keeps
        #: its id from being reused by another one while the entry lives
        self.done: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}

    def load(self, module: nn.Module, prefix: str, recurse: bool = True) -> list[tuple[nn.Module, str]]:
        """Read every meta parameter of ``module`` (called ``prefix`` in the model); returns what was read."""
        loaded = []
        subs = module.named_modules(prefix=prefix) if recurse else [(prefix, module)]
        for sub_name, sub in subs:
            for pname, param in list(sub._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                if id(param) not in self.done:  # (every name was checked against the checkpoint up front)
                    t = self.ckpt.get(_checkpoint_key(f"{sub_name}.{pname}" if sub_name else pname))
                    t = t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)
                    self.done[id(param)] = (param, nn.Parameter(t, requires_grad=param.requires_grad))
                sub._parameters[pname] = self.done[id(param)][1]
                loaded.append((sub, pname))
        # the analogue layers' converter ranges and transforms (and the module's buffers) join its weights
        if recurse:
            module.to(self.device)
        else:
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.to(self.device)
            for child in module.children():
                if isinstance(child, AnalogMatrix):
                    child.to(self.device)
        return loaded

    def forget(self, loaded: list[tuple[nn.Module, str]]) -> None:
        """Drop the reader's references to what :meth:`load` read (a deployed block's weights must not
        outlive their FreedWeight placeholders)."""
        read = {id(sub._parameters[pname]) for sub, pname in loaded}
        for key in [k for k, (_, v) in self.done.items() if id(v) in read]:
            del self.done[key]

    def release(self, loaded: list[tuple[nn.Module, str]]) -> None:
        """Put the parameters that :meth:`load` read back on the meta device (only those: the mapping's
        converter ranges live in the same modules)."""
        self.forget(loaded)
        for sub, pname in loaded:
            param = sub._parameters[pname]
            sub._parameters[pname] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                  requires_grad=param.requires_grad)


@contextmanager
def _blocks_on_demand(blocks: nn.ModuleList, prefix: str, read: Callable[[nn.Module, str], list],
                      release: Callable[[list], None]) -> Iterator[None]:
    """Inside the block, each decoder block is read just before its forward and dropped right after."""
    handles, live = [], {}

    def before(i: int):
        def hook(module, args, kwargs):
            live[i] = read(module, f"{prefix}.{i}")
        return hook

    def after(i: int):
        def hook(module, args, kwargs, output):
            release(live.pop(i))
        return hook

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(before(i), with_kwargs=True))
        handles.append(block.register_forward_hook(after(i), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _streaming_config(config: AnalogConfig | str | None) -> tuple[AnalogConfig, str | None]:
    """The config block-by-block loading uses, and why it serves no KV prefix where the config asks for the
    BOS token's (``kv_prefix: bos``): the prefix's keys and values need every decoder block's digital
    weights at once."""
    if config is None or isinstance(config, str):
        config = AnalogConfig.from_profile(config or "pcm")
    if config.kv_prefix == "bos":  # served where it can be, and here it cannot
        return config.set("kv_prefix", []), ("kv_prefix 'bos': no prefix, block-by-block loading never holds "
                                             "every block's digital weights")
    if config.kv_prefix:
        raise ValueError("kv_prefix: its keys and values need every decoder block's digital weights at once, "
                         "which block-by-block loading never holds; load the model whole (load_model, "
                         "analogize_, deploy_) or set kv_prefix to []")
    return config, None


def stream_deploy(source: str | Path, config: AnalogConfig | str | None = None, *, seed: int = 0,
                  seconds: float = 0.0, calibration: torch.Tensor | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, progress: bool = False) -> nn.Module:
    """Load the digital checkpoint folder ``source`` onto chip instance ``seed`` at ``seconds``, block by
    block: the model :func:`analogllm.analogize_` (with ``calibration``, token blocks [n, L], mapped as
    ``config.mapping`` says) and :func:`analogllm.deploy_` give, in eval mode and deployed, without ever
    holding more than one decoder block of digital weights on ``device``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from analogllm.chip.program import deploy_matrices_
    from analogllm.hf.quantizer import attach
    from analogllm.nn.convert import analog_matrices, analogize_
    from analogllm.ops.memory import return_freed_memory

    device = torch.device(device)
    ckpt = Checkpoint(source)
    config, why_no_prefix = _streaming_config(config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source, local_files_only=True), dtype=dtype)
    model.tie_weights()  # built empty, a tied LM head is its own meta tensor until tied
    model.eval()
    analogize_(model, config, attach=False)
    if why_no_prefix:
        model.analog_report.notes.append(why_no_prefix)
    _check_keys(model, ckpt)
    prefix, blocks = decoder_blocks(model)
    reader = _Reader(ckpt, device, dtype)
    for name, module in model.named_modules():
        if name != prefix and not name.startswith(prefix + "."):
            reader.load(module, name, recurse=False)
    mapper = _Mapper(model, config, calibration, progress) if calibration is not None else None
    if mapper is not None:
        with _blocks_on_demand(blocks, prefix, mapper.reading(reader), reader.release):
            mapper.capture()
        return_freed_memory()
    names = [n for n, _, _ in analog_matrices(model)]
    for i, block in enumerate(tqdm(blocks, desc="programming blocks", disable=not progress, leave=False)):
        loaded = (mapper.reading(reader) if mapper else reader.load)(block, f"{prefix}.{i}")
        if mapper is not None:
            mapper.map({n for n in names if n.startswith(f"{prefix}.{i}.")})
            return_freed_memory()  # the mapping's temporaries, before programming adds its own
        reader.forget(loaded)
        deploy_matrices_(block, seed, seconds)
    outside = {n for n in names if not n.startswith(prefix + ".")}
    if mapper is not None and outside:
        mapper.map(outside)
    deploy_matrices_(model, seed, seconds)  # any analogue layer outside the blocks (the blocks are done)
    if mapper is not None:
        model.analog_report.mapping = mapper.finish()
    attach(model)
    return model


def _check_keys(model: nn.Module, ckpt: Checkpoint) -> None:
    """Fail before reading anything when the checkpoint lacks a tensor the model needs (a family whose
    saved names differ from its modules', as transformers' MoE expert layouts do)."""
    missing = sorted({_checkpoint_key(n) for n, p in model.named_parameters() if p.is_meta} - set(ckpt.entries))
    if missing:
        raise KeyError(f"{ckpt.folder}: the checkpoint has no tensor {missing[0]!r} (and {len(missing) - 1} more "
                       "missing); streaming reads the tensors under the model's own parameter names. Load this "
                       "model whole instead (analogllm.hf.models.load_model, then analogize_ and deploy_).")


class _Mapper:
    """:func:`analogllm.mapping.map_` in the two passes of a streamed load: the rotation outside the
    blocks and the input capture first, then the per-block steps as each block is read again."""

    def __init__(self, model: nn.Module, config: AnalogConfig, blocks: torch.Tensor, progress: bool) -> None:
        from analogllm.mapping import MappingReport, begin_rotation

        self.model, self.spec, self.blocks, self.progress = model, config.mapping, blocks, progress
        self.start = time.perf_counter()
        self.report = MappingReport()
        self.rotations = begin_rotation(model, self.spec, self.report)
        self.inputs: dict = {}

    def reading(self, reader: _Reader) -> Callable[[nn.Module, str], list]:
        """``reader.load`` followed by the block's residual rotation."""

        def read(block: nn.Module, name: str) -> list:
            loaded = reader.load(block, name)
            if self.rotations is not None:
                self.rotations.rotate_layer_(block)
            return loaded

        return read

    def capture(self) -> None:
        from analogllm.mapping.capture import capture_inputs

        self.inputs = capture_inputs(self.model, self.blocks, self.spec.tokens, seed=self.spec.seed,
                                     progress=self.progress)

    def map(self, names: set[str]) -> None:
        from analogllm.mapping import map_layers_

        map_layers_(self.model, self.inputs, self.spec, self.report, names=names)
        for key in [k for k in self.inputs if k[0] in names]:
            del self.inputs[key]  # those layers are done: their samples are not needed again

    def finish(self):
        self.report.seconds = time.perf_counter() - self.start
        return self.report


__all__ = ["Checkpoint", "decoder_blocks", "stream_deploy"]
