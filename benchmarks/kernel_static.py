"""Static kernel figures without a GPU: the fused PoseScore kernels compiled for real targets, their
resources and instruction mix read from the SASS, and a roofline model of their time on H100 and H200.

Every launch the op's launchers would make for a variant (logits dtype, layout, float or per-channel
sigma, with or without segment/sigma gradients, ``pose_score`` or ``heatmap_divergence``) at each shape
is compiled exactly as a launch would compile it (same arguments, same specialisation), with
``triton.compile`` for ``GPUTarget("cuda", 80 | 90, 32)``; Triton's wheel carries ``ptxas`` and
``cuobjdump``, so no GPU or driver is needed. From the cubin: registers, stack, local and shared memory,
spill instructions. From the SASS: the instructions of each path through the kernel's tile loop
(the full path near a keypoint and the background path, where the kernels have both), counted per
heatmap element by execution pipe.

The model (assumptions in ``DEVICES`` and written into the results) takes each wave of programs as the
slowest of memory (its bytes over the copy bandwidth, or over what its resident programs can keep in
flight against the memory latency) and the instruction pipes (issue, FP32, integer/logic, special
functions, load/store) at their peak rates, and each launch as its waves plus a fixed launch latency.
It says which figure limits a kernel; it is no substitute for a measurement on the device.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

SHAPE_DRPOSE = (12, 43, 96, 96)  # B=2 x 6 views, 22 joints + 21 bones, latent-size heatmaps
TARGETS = {"sm_80": 80, "sm_90": 90}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ("contiguous", "channels_last", "strided")
SIGMAS = ("float", "tensor")
MODES = ("pose_score", "heatmap_divergence")
SIGMA = 2.0


# --------------------------------------------------------------------------------------------------
# Devices (the model's assumptions)


@dataclass(frozen=True)
class Device:
    """Peak figures per SM per clock (thread-operations) from NVIDIA's published specifications and the
    CUDA programming guide's throughput table for compute capability 9.0."""

    name: str
    sms: int
    clock_ghz: float  # boost clock the peak figures are quoted at
    hbm_gbps: float  # peak memory bandwidth
    copy_fraction: float  # achievable share of the peak for a device-to-device copy (assumed)
    memory_latency_ns: float  # DRAM load latency under load (assumed)
    launch_us: float  # launch latency per kernel on a busy stream (assumed)
    issue: int = 128  # 4 schedulers x 1 warp instruction per clock
    fp32: int = 128  # FFMA / FADD / FMUL / IMAD
    alu: int = 64  # integer, logic, compare, select, min/max, conversions between 16/32-bit types
    mufu: int = 16  # special functions: EX2, LG2, RCP, RSQ, SIN, COS, TANH
    lsu: int = 32  # global / shared / local memory instructions
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32

    @property
    def copy_gbps(self) -> float:
        return self.hbm_gbps * self.copy_fraction


DEVICES = {
    "H100": Device("H100 SXM5 80GB", sms=132, clock_ghz=1.98, hbm_gbps=3350.0, copy_fraction=0.9,
                   memory_latency_ns=600.0, launch_us=3.0),
    "H200": Device("H200 SXM 141GB", sms=132, clock_ghz=1.98, hbm_gbps=4800.0, copy_fraction=0.9,
                   memory_latency_ns=600.0, launch_us=3.0),
}
ROOFLINE_ARCH = 90  # both devices are sm_90

PIPES = ("issue", "fp32", "alu", "mufu", "lsu")


def pipe_of(opcode: str) -> str | None:
    """The execution pipe of a SASS opcode besides issue (None: issue slot only, e.g. branches)."""
    base = opcode.split(".")[0]
    if base == "MUFU":
        return "mufu"
    if base in ("FFMA", "FADD", "FMUL", "FFMA32I", "FADD32I", "FMUL32I", "IMAD", "IMAD32I", "HFMA2", "HADD2",
                "HMUL2", "FSWZADD"):
        return "fp32"
    if base in ("LDG", "STG", "LDS", "STS", "LDL", "STL", "LD", "ST", "ATOM", "ATOMS", "ATOMG", "RED", "SHFL",
                "LDSM", "LDGSTS", "LDC"):
        return "lsu"
    if base in ("BRA", "EXIT", "BSSY", "BSYNC", "BAR", "WARPSYNC", "NOP", "CALL", "RET", "BREAK", "YIELD",
                "S2R", "S2UR", "CS2R", "DEPBAR", "MEMBAR", "ERRBAR", "CCTL", "VOTE", "VOTEU", "R2UR", "BMOV") \
            or base.startswith("U"):
        return None  # control, special registers and uniform-datapath work: an issue slot only
    return "alu"


# --------------------------------------------------------------------------------------------------
# Compiling a launch for a real target


@dataclass
class Compiled:
    kernel: str
    arch: int
    num_warps: int
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    spill_instructions: int
    sass: str = field(repr=False)
    compile_s: float = 0.0
    specialisation: str = ""


# Registers and occupancy: sm_80 and sm_90 alike
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256
MAX_WARPS_PER_SM = 64
MIN_WARPS_PER_SM = 16
"""The occupancy floor every kernel must allow: its register count may not hold an SM below 16 resident
warps (25%), which the memory-bound kernels need to keep enough loads in flight."""


def warps_allowed_by_registers(registers: int, num_warps: int) -> int:
    """Resident warps per SM that a kernel's register count allows (in whole blocks of ``num_warps``)."""
    per_warp = -(-max(registers, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    blocks = REGISTERS_PER_SM // (per_warp * num_warps)
    return min(blocks * num_warps, MAX_WARPS_PER_SM // num_warps * num_warps)


def _specialised_source(launch, target):
    """The ASTSource and options a launch of ``launch`` compiles to on ``target`` (as JITFunction.run does)."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.constexprs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.constexprs, bound, specialization,
                                                             options)
    return ASTSource(kernel, signature, constexprs, attrs), options


def _tool(name: str) -> str:
    import triton

    return getattr(triton.knobs.nvidia, name).path


def specialisation_key(launch, arch: int) -> str:
    """What one compiled kernel depends on: the kernel's source (with what it calls), its argument types
    and specialisations, constexprs and options, the target and the Triton version. Equal keys compile to
    the same cubin, so results recorded under a key (``kernel_static.json``) stand for a compile."""
    import hashlib

    import triton
    from triton.backends.compiler import GPUTarget

    source, options = _specialised_source(launch, GPUTarget("cuda", arch, 32))
    settings = dict(options.__dict__)
    settings["extern_libs"] = tuple((name, os.path.basename(path)) for name, path in settings.get("extern_libs") or ())
    text = f"{triton.__version__}-sm_{arch}-{source.hash()}-{sorted(settings.items())!r}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def compile_launch(launch, arch: int, cache: dict) -> Compiled:
    """Compile one launch for sm_<arch> (cached by its specialisation); read resources from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    source, options = _specialised_source(launch, target)
    key = specialisation_key(launch, arch)
    if key in cache:
        return cache[key]
    started = time.perf_counter()
    compiled = triton.compile(source, target=target, options=options.__dict__)
    elapsed = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    result = Compiled(
        kernel=launch.kernel.__name__, arch=arch, num_warps=options.num_warps,
        registers=int(fields.get("REG", 0)), stack_bytes=int(fields.get("STACK", 0)),
        local_bytes=int(fields.get("LOCAL", 0)),
        shared_bytes=max(int(fields.get("SHARED", 0)), int(compiled.metadata.shared)),
        spill_instructions=sum(1 for op in sass_opcodes(sass) if op.split(".")[0] in ("LDL", "STL")),
        sass=sass, compile_s=elapsed, specialisation=key,
    )
    cache[key] = result
    return result


# --------------------------------------------------------------------------------------------------
# SASS: instructions, basic blocks, the tile loop and its paths

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


@dataclass
class Instruction:
    address: int
    opcode: str
    predicated: bool
    target: int | None  # branch target


def parse_sass(sass: str) -> list[Instruction]:
    found = []
    for match in _INSTRUCTION.finditer(sass):
        address, predicate, opcode, operands = match.groups()
        target = None
        if opcode.split(".")[0] == "BRA":
            jump = re.search(r"0x([0-9a-f]+)", operands)
            target = int(jump.group(1), 16) if jump else None
        found.append(Instruction(int(address, 16), opcode, predicate is not None, target))
    return found


def sass_opcodes(sass: str) -> list[str]:
    return [i.opcode for i in parse_sass(sass)]


@dataclass
class Block:
    start: int
    instructions: list[Instruction]
    successors: list[int] = field(default_factory=list)


def basic_blocks(instructions: list[Instruction]) -> dict[int, Block]:
    """Blocks keyed by start address, with successor edges (fall-through and branch targets)."""
    if not instructions:
        return {}
    leaders = {instructions[0].address}
    for index, ins in enumerate(instructions):
        ends_block = ins.target is not None or ins.opcode.startswith("EXIT")
        if ins.target is not None:
            leaders.add(ins.target)
        if ends_block and index + 1 < len(instructions):
            leaders.add(instructions[index + 1].address)
    blocks: dict[int, Block] = {}
    current = None
    for ins in instructions:
        if ins.address in leaders:
            current = blocks.setdefault(ins.address, Block(ins.address, []))
        current.instructions.append(ins)
    starts = sorted(blocks)
    for position, start in enumerate(starts):
        last = blocks[start].instructions[-1]
        unconditional = not last.predicated and (last.target is not None or last.opcode.startswith("EXIT"))
        if last.target is not None and last.target in blocks:
            blocks[start].successors.append(last.target)
        if not unconditional and position + 1 < len(starts):
            blocks[start].successors.append(starts[position + 1])
    return blocks


def natural_loops(blocks: dict[int, Block]) -> list[tuple[int, set[int]]]:
    """(header, body) of every loop closed by a backward branch."""
    predecessors: dict[int, list[int]] = {b: [] for b in blocks}
    for start, block in blocks.items():
        for s in block.successors:
            predecessors[s].append(start)
    loops = []
    for start, block in blocks.items():
        for header in block.successors:
            if header <= start:  # a backward edge start -> header
                body, stack = {header, start}, [start]
                while stack:
                    node = stack.pop()
                    if node == header:
                        continue
                    for p in predecessors[node]:
                        if p not in body:
                            body.add(p)
                            stack.append(p)
                loops.append((header, body))
    return loops


@dataclass
class PathCounts:
    """Instructions per thread of one path through one iteration of the tile loop, by pipe."""

    instructions: int
    by_pipe: dict[str, int]
    by_opcode: dict[str, int]
    global_loads: int
    global_stores: int


def _counts(instructions: list[Instruction]) -> PathCounts:
    by_pipe = Counter({p: 0 for p in PIPES})
    by_opcode = Counter()
    for ins in instructions:
        by_pipe["issue"] += 1
        pipe = pipe_of(ins.opcode)
        if pipe:
            by_pipe[pipe] += 1
        by_opcode[ins.opcode.split(".")[0]] += 1
    return PathCounts(
        instructions=len(instructions), by_pipe=dict(by_pipe), by_opcode=dict(by_opcode),
        global_loads=sum(1 for i in instructions if i.opcode.startswith("LDG")),
        global_stores=sum(1 for i in instructions if i.opcode.startswith("STG")),
    )


@dataclass
class LoopAnalysis:
    paths: list[PathCounts]  # distinct paths through one tile-loop iteration, most instructions first
    outside_loop: PathCounts  # once per program (prologue, reduction, epilogue)
    other_loops: PathCounts  # loops around the tile loop (once per tile at most)


def analyse_sass(sass: str, max_paths: int = 64) -> LoopAnalysis:
    """Find the tile loop (the innermost loop with the most global loads and instructions) and count the
    instructions of every path through one of its iterations."""
    instructions = parse_sass(sass)
    blocks = basic_blocks(instructions)
    loops = natural_loops(blocks)
    if not loops:
        everything = _counts(instructions)
        return LoopAnalysis([everything], _counts([]), _counts([]))
    headers = {h for h, _ in loops}
    innermost = [(h, body) for h, body in loops if not any(o != h and o in body for o in headers)]

    def weight(loop):
        body = loop[1]
        ins = [i for b in body for i in blocks[b].instructions]
        return (sum(i.opcode.startswith(("LDG", "STG")) for i in ins), len(ins))

    header, body = max(innermost, key=weight)
    latches = {b for b in body if header in blocks[b].successors}
    paths: list[list[int]] = []

    def walk(node: int, path: list[int]):
        if len(paths) >= max_paths:
            return
        path = path + [node]
        if node in latches:
            paths.append(path)
        for s in blocks[node].successors:
            if s in body and s != header and s not in path:
                walk(s, path)

    walk(header, [])
    counted = {}
    for path in paths:
        c = _counts([i for b in path for i in blocks[b].instructions])
        counted[(c.instructions, tuple(sorted(c.by_pipe.items())))] = c
    in_any_loop = set().union(*(b for _, b in loops))
    outside = [i for b in blocks if b not in in_any_loop for i in blocks[b].instructions]
    around = [i for b in in_any_loop - body for i in blocks[b].instructions]
    return LoopAnalysis(sorted(counted.values(), key=lambda c: -c.instructions), _counts(outside), _counts(around))


# --------------------------------------------------------------------------------------------------
# Variants


@dataclass(frozen=True)
class Variant:
    mode: str
    dtype: str
    layout: str
    sigma: str
    target_grads: bool

    @property
    def name(self) -> str:
        grads = "+target_grads" if self.target_grads else ""
        return f"{self.mode}/{self.dtype}/{self.layout}/sigma_{self.sigma}{grads}"


def all_variants(dtypes=tuple(DTYPES)) -> list[Variant]:
    return [Variant(m, d, l, s, g) for m in MODES for d in dtypes for l in LAYOUTS for s in SIGMAS
            for g in (False, True)]


def representative_variants() -> list[Variant]:
    """A covering set: every dtype, layout, sigma kind and mode, with and without target gradients, in four
    variants (nine distinct kernels per target), for a default test run that must stay short."""
    return [
        Variant("pose_score", "fp32", "contiguous", "float", False),
        Variant("pose_score", "bf16", "channels_last", "tensor", True),
        Variant("heatmap_divergence", "fp16", "strided", "tensor", False),
        Variant("heatmap_divergence", "bf16", "contiguous", "float", True),
    ]


def meta_logits(shape, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """Logits of a shape and layout on the meta device: strides are real, no memory is used."""
    n, c, h, w = shape
    if layout == "contiguous":
        return torch.empty(shape, dtype=dtype, device="meta")
    if layout == "channels_last":
        return torch.empty((n, h, w, c), dtype=dtype, device="meta").permute(0, 3, 1, 2)
    if layout == "strided":  # every other channel of a wider tensor, maps transposed
        return torch.empty((n, 2 * c, w, h), dtype=dtype, device="meta")[:, ::2].transpose(-1, -2)
    raise ValueError(f"unknown layout {layout!r}")


def variant_launches(variant: Variant, shape) -> list:
    from drpose_kernels import pose_score_op

    n, c, h, w = shape
    logits = meta_logits(shape, DTYPES[variant.dtype], variant.layout)
    segments = torch.empty((n, c, 2, 2), device="meta")
    sigma = torch.empty((c,), device="meta") if variant.sigma == "tensor" else SIGMA
    weights = torch.empty((n, c), device="meta") if variant.mode == "pose_score" else None
    return pose_score_op.static_launches(logits, segments, sigma, weights, num_views=1,
                                         needs_target_grad=variant.target_grads)


def verify_compiles(shape=SHAPE_DRPOSE, targets=tuple(TARGETS), recorded: dict | None = None,
                    fresh: list[Variant] | None = None) -> list[dict]:
    """Every variant's kernels at ``shape`` for ``targets``, one entry per distinct compiled kernel: registers,
    stack and local memory, spill instructions, the warps per SM its registers allow, and where the figures
    come from. A kernel whose specialisation key is in ``recorded`` (``kernel_static.json`` rows by key) is
    taken from there (same key, same cubin); the others, and every kernel of the ``fresh`` variants, are
    compiled now, and a fresh compile that has a record is checked against it."""
    recorded = recorded or {}
    fresh_names = {v.name for v in (fresh or [])}
    entries: dict[str, dict] = {}
    cache: dict = {}
    for variant in all_variants():
        for launch in variant_launches(variant, shape):
            for arch_name in targets:
                key = specialisation_key(launch, TARGETS[arch_name])
                entry = entries.get(key)
                if entry is None:
                    entry = entries[key] = {"key": key, "target": arch_name, "launch": launch.name,
                                            "use": f"{variant.name} at {shape}", "compile": False}
                entry["compile"] |= variant.name in fresh_names or key not in recorded
                entry["_launch"] = entry.get("_launch", launch)
    for entry in entries.values():
        launch = entry.pop("_launch")
        record = recorded.get(entry["key"])
        if entry["compile"]:
            compiled = compile_launch(launch, TARGETS[entry["target"]], cache)
            figures = {"registers": compiled.registers, "stack_bytes": compiled.stack_bytes,
                       "local_bytes": compiled.local_bytes, "spill_instructions": compiled.spill_instructions,
                       "num_warps": compiled.num_warps}
            entry["source"] = "compiled"
            if record is not None:
                entry["recorded_registers"] = record["registers"]
        else:
            figures = {k: record[k] for k in ("registers", "stack_bytes", "local_bytes", "spill_instructions")}
            figures["num_warps"] = record["config"]["num_warps"]
            entry["source"] = "recorded"
        entry.update(figures)
        entry["warps_allowed_by_registers"] = warps_allowed_by_registers(figures["registers"], figures["num_warps"])
    return list(entries.values())


# --------------------------------------------------------------------------------------------------
# The roofline


def occupancy(compiled: Compiled, device: Device) -> dict:
    threads = 32 * compiled.num_warps
    regs = max(compiled.registers, 1)
    by_regs = device.regs_per_sm // (regs * threads)  # ignores register allocation granularity
    by_warps = device.max_warps_per_sm // compiled.num_warps
    by_shared = (228 * 1024) // compiled.shared_bytes if compiled.shared_bytes else device.max_blocks_per_sm
    blocks = max(0, min(by_regs, by_warps, by_shared, device.max_blocks_per_sm))
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * compiled.num_warps,
            "occupancy": blocks * compiled.num_warps / device.max_warps_per_sm}


def launch_model(launch, compiled: Compiled, loop: LoopAnalysis, device: Device, full_fraction: float) -> dict:
    """Predicted time of one launch on ``device`` with a share ``full_fraction`` of tiles on the full path.

    Programs run in waves of (blocks per SM x SMs). A wave takes the longest of its pipes (its programs'
    instructions at the SMs' peak rates, the busiest SM setting the pace) and its memory traffic at the
    copy bandwidth, or at the bandwidth its resident programs can sustain with one tile's loads in flight
    each (bytes in flight / memory latency), whichever is lower.
    """
    threads = 32 * compiled.num_warps
    programs = math.prod(launch.grid)
    occ = occupancy(compiled, device)
    if not launch.tile:  # no loop over heatmap pixels (the per-sample weighting): latency only
        return {"predicted_us": device.launch_us, "limiter": "launch", "memory_us": 0.0, "pipe_us": {},
                "waves": 1.0, **occ}
    loops = getattr(launch, "loops", ()) or (max(1, math.ceil(launch.elements / max(programs, 1) / launch.tile)),)
    tiles_per_program, outer_steps = math.prod(loops), math.prod(loops[:-1])
    full, background = loop.paths[0], loop.paths[-1]
    per_program = {}
    for pipe in PIPES:
        per_tile = full_fraction * full.by_pipe[pipe] + (1 - full_fraction) * background.by_pipe[pipe]
        per_program[pipe] = (tiles_per_program * per_tile + outer_steps * loop.other_loops.by_pipe[pipe]
                             + loop.outside_loop.by_pipe[pipe]) * threads
    clock = device.clock_ghz * 1e9
    bytes_per_program = launch.bytes / programs
    inflight_per_program = launch.tile * launch.args[0].element_size()  # one tile of logits being read
    slots = max(1, occ["blocks_per_sm"] * device.sms)
    waves = [slots] * (programs // slots) + ([programs % slots] if programs % slots else [])
    totals = {"memory": 0.0, **{p: 0.0 for p in PIPES}}
    elapsed = 0.0
    for resident in waves:
        busiest = math.ceil(resident / device.sms)  # programs on the most loaded SM
        pipe_s = {p: busiest * per_program[p] / (getattr(device, p) * clock) for p in PIPES}
        bandwidth = min(device.copy_gbps, resident * inflight_per_program / device.memory_latency_ns)  # GB/s
        memory_s = resident * bytes_per_program / (bandwidth * 1e9)
        for key, value in (("memory", memory_s), *pipe_s.items()):
            totals[key] += value
        elapsed += max(memory_s, *pipe_s.values())
    limiter = max(totals, key=totals.get)
    return {
        "predicted_us": elapsed * 1e6 + device.launch_us, "limiter": limiter, "memory_us": totals["memory"] * 1e6,
        "pipe_us": {p: totals[p] * 1e6 for p in PIPES}, "waves": programs / slots, **occ,
    }


def per_element(loop: LoopAnalysis, launch, compiled: Compiled) -> dict:
    """Instruction counts per heatmap element of the full and the background path."""
    per_thread_tile = launch.tile / (32 * compiled.num_warps)

    def scaled(c: PathCounts) -> dict:
        return {
            "instructions": c.instructions / per_thread_tile,
            "mufu": c.by_pipe["mufu"] / per_thread_tile,
            "fp32": c.by_pipe["fp32"] / per_thread_tile,
            "alu": c.by_pipe["alu"] / per_thread_tile,
            "global_loads": c.global_loads / per_thread_tile,
            "global_stores": c.global_stores / per_thread_tile,
        }

    return {"full": scaled(loop.paths[0]), "background": scaled(loop.paths[-1]), "paths": len(loop.paths)}


# --------------------------------------------------------------------------------------------------
# Which tiles take the full path at the benchmark's inputs


def full_tile_fraction(launch, segments: torch.Tensor, sigma: float) -> float:
    """Share of tile steps on the full path for these segments, by the kernels' own tile test (1 for
    kernels without a background path)."""
    from drpose_kernels import pose_score_op

    near = getattr(pose_score_op, "near_tiles", None)
    if near is None or "BLOCK_H" not in launch.constexprs:
        return 1.0
    n, c, h, w = launch.args[0].shape
    return float(near(segments, sigma, h, w, launch.constexprs).float().mean())


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class StaticSettings:
    targets: list[str]
    shapes: list[tuple]  # every variant at each of these
    variants: list[Variant]
    roofline_shapes: list[tuple]
    roofline_dtypes: list[str]
    sweep_shapes: list[tuple] = field(default_factory=list)  # only ``sweep_variants`` at these
    sweep_variants: list[Variant] = field(default_factory=list)


def benchmark_segments(shape) -> torch.Tensor:
    """The kernel benchmark's segments for ``shape`` (same generator and draws)."""
    import kernel_suite

    _, segments, _ = kernel_suite.make_inputs(shape, torch.float32, torch.device("cpu"))
    return segments


def kernel_row(launch, compiled: Compiled, loop: LoopAnalysis, arch_name: str) -> dict:
    """One compiled kernel: its resources and per-element instruction mix (the uses are added by ``run``)."""
    return {
        "target": arch_name, "launch": launch.name, "kernel": compiled.kernel,
        "config": {k: v for k, v in launch.constexprs.items() if k.isupper() or k == "num_warps"},
        "registers": compiled.registers, "stack_bytes": compiled.stack_bytes, "local_bytes": compiled.local_bytes,
        "shared_bytes": compiled.shared_bytes, "spill_instructions": compiled.spill_instructions,
        "warps_allowed_by_registers": warps_allowed_by_registers(compiled.registers, compiled.num_warps),
        "specialisation": compiled.specialisation,
        "bytes_per_element": launch.bytes / max(launch.elements, 1),
        "per_element": per_element(loop, launch, compiled) if launch.tile else None,
        "compile_s": compiled.compile_s, "uses": [],
    }


def run(settings: StaticSettings, progress) -> tuple[list[dict], dict]:
    """Compile every (shape, variant) launch for every target; one row per distinct compiled kernel, listing
    the (shape, variant) uses that compile to it."""
    cache: dict = {}
    by_key: dict[str, dict] = {}
    work = [(shape, v) for shape in settings.shapes for v in settings.variants]
    work += [(shape, v) for shape in settings.sweep_shapes for v in settings.sweep_variants]
    for shape, variant in dict.fromkeys(work):
        launches = variant_launches(variant, shape)
        for arch_name in settings.targets:
            arch = TARGETS[arch_name]
            done = []
            for launch in launches:
                compiled = compile_launch(launch, arch, cache)
                row = by_key.get(compiled.specialisation)
                if row is None:
                    row = by_key[compiled.specialisation] = kernel_row(launch, compiled, analyse_sass(compiled.sass),
                                                                      arch_name)
                row["uses"].append("({}, {}, {}, {}) ".format(*shape) + variant.name)
                done.append(f"{launch.name} {compiled.registers} regs")
            progress(f"{arch_name} {shape} {variant.name}: " + ", ".join(done))
    rows = list(by_key.values())
    analyses: dict = {}
    roofline = []
    for shape in settings.roofline_shapes:
        segments = benchmark_segments(shape)
        for dtype in settings.roofline_dtypes:
            variant = Variant("pose_score", dtype, "contiguous", "float", False)
            launches = variant_launches(variant, shape)
            for device_key, device in DEVICES.items():
                for case, forced in (("benchmark inputs", None), ("every tile near a keypoint", 1.0)):
                    parts = []
                    for launch in launches:
                        compiled = compile_launch(launch, ROOFLINE_ARCH, cache)
                        if compiled.specialisation not in analyses:
                            analyses[compiled.specialisation] = analyse_sass(compiled.sass)
                        loop = analyses[compiled.specialisation]
                        fraction = forced if forced is not None else full_tile_fraction(launch, segments, SIGMA)
                        model = launch_model(launch, compiled, loop, device, fraction)
                        parts.append({"launch": launch.name, "bytes": launch.bytes, "full_tile_fraction": fraction,
                                      "registers": compiled.registers, **model})
                    total_us = sum(p["predicted_us"] for p in parts)
                    total_bytes = sum(p["bytes"] for p in parts)
                    copy_us = total_bytes / (device.copy_gbps * 1e9) * 1e6
                    roofline.append({
                        "shape": list(shape), "dtype": dtype, "device": device_key, "case": case,
                        "fwd_bwd_predicted_us": total_us, "bytes": total_bytes, "copy_bound_us": copy_us,
                        "pct_of_copy_bandwidth": 100 * copy_us / total_us, "launches": parts,
                    })
    meta = {
        "devices": {k: {**asdict(v), "copy_gbps": v.copy_gbps} for k, v in DEVICES.items()},
        "roofline_arch": f"sm_{ROOFLINE_ARCH}",
        "compiled_kernels": len(cache),
        "compile_s": sum(c.compile_s for c in cache.values()),
        "model": __doc__.split("\n\n")[2].replace("\n", " "),
        "roofline": roofline,
    }
    return rows, meta


def markdown(rows: list[dict], meta: dict) -> str:
    from common import markdown_table

    lines = ["Static model, no GPU: figures from compiled cubins and their SASS; predicted times are a roofline",
             "model, not measurements. Assumptions per device:", ""]
    for key, d in meta["devices"].items():
        lines.append(f"- {key} ({d['name']}): {d['sms']} SMs at {d['clock_ghz']} GHz; HBM {d['hbm_gbps']:.0f} GB/s, "
                     f"copy bandwidth assumed {100 * d['copy_fraction']:.0f}% of it ({d['copy_gbps']:.0f} GB/s); "
                     f"per SM per clock: issue {d['issue']}, FP32 {d['fp32']}, ALU {d['alu']}, MUFU {d['mufu']}, "
                     f"LSU {d['lsu']} thread-ops; memory latency {d['memory_latency_ns']:.0f} ns; "
                     f"launch {d['launch_us']} us")
    lines += ["", f"- model: {meta['model']}", ""]
    text = "\n".join(lines) + "\n"
    body = []
    for r in meta["roofline"]:
        parts = "; ".join(f"{p['launch']} {p['predicted_us']:.1f} us ({p['limiter']}, full tiles "
                          f"{100 * p['full_tile_fraction']:.0f}%, {p['warps_per_sm']} warps/SM)" for p in r["launches"])
        body.append(["({}, {}, {}, {})".format(*r["shape"]), r["dtype"], r["device"], r["case"],
                     f"{r['fwd_bwd_predicted_us']:.1f}", f"{r['copy_bound_us']:.1f}",
                     f"{r['pct_of_copy_bandwidth']:.1f}", parts])
    text += "Predicted forward + backward of `pose_score` (contiguous logits, float sigma):\n\n"
    text += markdown_table(["shape (N, C, H, W)", "dtype", "device", "tiles", "predicted us", "copy-bound us",
                            "% of copy BW", "launches"], body)
    body = []
    for r in rows:
        pe = r["per_element"] or {}
        full, bg = pe.get("full", {}), pe.get("background", {})
        uses = r["uses"]
        body.append([r["target"], r["launch"], uses[0] + (f" (+{len(uses) - 1})" if len(uses) > 1 else ""),
                     ",".join(f"{k}={v}" for k, v in sorted(r["config"].items())),
                     str(r["registers"]), str(r["warps_allowed_by_registers"]), str(r["spill_instructions"]),
                     str(r["stack_bytes"]), str(r["shared_bytes"]),
                     f"{full.get('mufu', 0):.2f} / {bg.get('mufu', 0):.2f}",
                     f"{full.get('fp32', 0):.1f} / {bg.get('fp32', 0):.1f}",
                     f"{full.get('instructions', 0):.1f} / {bg.get('instructions', 0):.1f}",
                     f"{full.get('global_loads', 0):.3f}", f"{full.get('global_stores', 0):.3f}",
                     f"{r['bytes_per_element']:.1f}"])
    text += ("\nEvery distinct compiled kernel (one row each; \"first use\" names the first (shape, variant) that "
             "compiles to it, + how many more do; warps/SM: the resident warps its registers allow, floor "
             f"{MIN_WARPS_PER_SM}; per element: full path / background path of the tile loop):\n\n")
    text += markdown_table(["target", "launch", "first use", "config", "regs", "warps/SM", "spill instr", "stack B",
                            "shared B", "MUFU/elem", "FP32/elem", "instr/elem", "LDG/elem", "STG/elem", "bytes/elem"],
                           body)
    return text
