"""Measure CPU levers for the VGG16 conv stack: precision, layout, threads, batch, JIT, torch.compile, decoding.

Run: .venv/bin/python benchmarks/model_levers.py [--sections model,batch,threads,omp_wait,decode,overlap,cast,prepack]
     [--seconds 4] [--threads N] [--skip-compile]

On a shared, noisy machine the variants of a section are timed round-robin (one call each in turn) and
compared by their median call time, so a burst of load hits them all alike; each section also times the
engine's current path ("engine today") so the speed-ups are ratios measured side by side. The cosine column
compares GeM vectors with fp32 eager (random weights unless VSEARCH_WEIGHTS says otherwise, so it only shows
numerical drift).
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# A fresh inductor cache, so torch.compile's "prep" time is a cold start (a server restart reuses its cache).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="levers-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.features import DEFAULT_IMAGE_SIZE, preprocess  # noqa: E402
from engine.images import load_image  # noqa: E402
from engine.pooling import pool  # noqa: E402
from engine.weights import load_weights  # noqa: E402
from indexer.demo import COLOURS, STYLES, draw_shoe  # noqa: E402

SECTIONS = ("model", "batch", "threads", "omp_wait", "decode", "overlap", "cast", "prepack")
SIZE = DEFAULT_IMAGE_SIZE
CL = torch.channels_last
ENGINE = "eager, bf16 weights, channels_last (the engine before prepacking)"
PACKED = "engine today: prepacked, bf16 weights, channels_last"


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def conv_stack() -> torch.nn.Module:
    model = load_weights(os.environ.get("VSEARCH_WEIGHTS", "random")).features[:-1].eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def inputs(batch: int) -> torch.Tensor:
    """Preprocessed demo shoe photos: realistic values (mostly white background)."""
    colours = list(COLOURS.values())
    imgs = [preprocess(draw_shoe(STYLES[i % 4], colours[i % 8], seed=i), SIZE) for i in range(batch)]
    return torch.from_numpy(np.stack(imgs))


def compare(variants: dict[str, Callable[[], torch.Tensor]], seconds: float) -> dict[str, float]:
    """Median seconds per call of each variant, timed round-robin until each has run about `seconds`."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    while any(len(t) < 3 or sum(t) < seconds for t in times.values()):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def gem_cosine(ref: torch.Tensor, out: torch.Tensor) -> float:
    a, b = pool(ref.float(), "gem"), pool(out.float(), "gem")
    return float((a * b).sum(axis=1).min())


def header() -> None:
    print("| lever | config | images/s | vs eager, bf16 weights | GeM cosine vs fp32 (min) | note |")
    print("|---|---|---|---|---|---|", flush=True)


def report(lever: str, batch: int, medians: dict[str, float], cosines: dict[str, float], notes: dict[str, str]) -> None:
    base = medians.get(ENGINE)
    for name, median in medians.items():
        ips = batch / median
        speedup = f"{base / median:.2f}x" if base else "-"
        cos = f"{cosines[name]:.5f}" if name in cosines else "-"
        print(f"| {lever} | {name}, batch {batch} | {ips:.2f} | {speedup} | {cos} | {notes.get(name, '')} |", flush=True)


# -- model variants ----------------------------------------------------------------------------------


def eager(precision: str, layout: torch.memory_format = CL) -> Callable[[torch.Tensor], torch.Tensor]:
    model = conv_stack().to(memory_format=layout)
    if precision == "bf16 weights":
        model = model.to(torch.bfloat16)

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=layout)
        if precision == "bf16 weights":
            x = x.to(torch.bfloat16)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast"):
            return model(x).float()

    return fn


def jit_frozen(precision: str, example: torch.Tensor, fusion: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch.jit.trace + torch.jit.freeze (weights folded as constants, oneDNN weight prepacking)."""
    torch.jit.enable_onednn_fusion(fusion)
    model = conv_stack().to(memory_format=CL)
    dtype = torch.bfloat16 if precision == "bf16 weights" else torch.float32
    model = model.to(dtype)
    example = example.to(dtype).contiguous(memory_format=CL)
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(model, example))
        for _ in range(3):  # the profiling executor optimises (and fuses) on these runs
            frozen(example)

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return frozen(x.to(dtype).contiguous(memory_format=CL)).float()

    return fn


def mkldnn_module(precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch.utils.mkldnn.to_mkldnn: convs with weights prepacked for oneDNN once, in eager mode."""
    from torch.utils import mkldnn as mkldnn_utils

    dtype = torch.bfloat16 if precision == "bf16 weights" else torch.float32
    model = mkldnn_utils.to_mkldnn(conv_stack(), dtype)

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x.to_mkldnn(dtype)).to_dense().float()

    return fn


def compiled(precision: str, example: torch.Tensor, freezing: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = freezing
    model = conv_stack().to(memory_format=CL)
    if precision == "bf16 weights":
        model = model.to(torch.bfloat16)
    opt = torch.compile(model)
    autocast = precision == "bf16 autocast"

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=CL)
        if precision == "bf16 weights":
            x = x.to(torch.bfloat16)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return opt(x).float()

    fn(example)  # compiles
    return fn


def timed_build(builder: Callable[[], Callable], name: str, notes: dict[str, str]) -> Callable | None:
    log(f"preparing {name} ({load()})")
    t0 = time.perf_counter()
    try:
        fn = builder()
    except Exception as exc:  # noqa: BLE001 - a lever that fails is reported, not fatal
        print(f"| failed | {name} | - | - | - | {exc!r:.200} |", flush=True)
        return None
    notes[name] = f"prep {time.perf_counter() - t0:.0f}s"
    return fn


def section_model(seconds: float, batch: int = 8, skip_compile: bool = False) -> None:
    x = inputs(batch)
    with torch.inference_mode():
        ref = conv_stack()(x)
    notes: dict[str, str] = {}
    builders: dict[str, Callable[[], Callable]] = {
        ENGINE: lambda: eager("bf16 weights"),
        "eager, bf16 autocast, channels_last": lambda: eager("bf16 autocast"),
        "eager, fp32, contiguous": lambda: eager("fp32", torch.contiguous_format),
        "eager, fp32, channels_last": lambda: eager("fp32"),
        "eager, bf16 autocast, contiguous": lambda: eager("bf16 autocast", torch.contiguous_format),
        "eager, torch.utils.mkldnn.to_mkldnn, bf16 weights": lambda: mkldnn_module("bf16 weights"),
        "jit.trace+freeze, bf16 weights, default fuser": lambda: jit_frozen("bf16 weights", x, fusion=False),
        "jit.trace+freeze, fp32, oneDNN graph fusion": lambda: jit_frozen("fp32", x, fusion=True),
        "jit.trace+freeze, bf16 weights, oneDNN graph fusion": lambda: jit_frozen("bf16 weights", x, fusion=True),
    }
    if not skip_compile:
        builders |= {
            "torch.compile, fp32, no freezing": lambda: compiled("fp32", x, freezing=False),
            "torch.compile, bf16 autocast, no freezing": lambda: compiled("bf16 autocast", x, freezing=False),
            "torch.compile, fp32, freezing": lambda: compiled("fp32", x, freezing=True),
            "torch.compile, bf16 autocast, freezing": lambda: compiled("bf16 autocast", x, freezing=True),
            "torch.compile, bf16 weights, freezing": lambda: compiled("bf16 weights", x, freezing=True),
        }
    fns = {name: fn for name, b in builders.items() if (fn := timed_build(b, name, notes)) is not None}
    cosines = {name: gem_cosine(ref, fn(x)) for name, fn in fns.items()}
    log(f"timing {len(fns)} variants round-robin ({load()})")
    medians = compare({name: (lambda fn=fn: fn(x)) for name, fn in fns.items()}, seconds)
    report("model", batch, medians, cosines, {k: f"{v}; {load()}" for k, v in notes.items()})


def section_batch(seconds: float) -> None:
    """The engine path vs the levers that prepack weights, at each batch size."""
    x1 = inputs(1)
    fns = {
        ENGINE: eager("bf16 weights"),
        "to_mkldnn, bf16 weights": mkldnn_module("bf16 weights"),
        "jit.trace+freeze, bf16 weights, oneDNN graph fusion": jit_frozen("bf16 weights", x1, fusion=True),
        "torch.compile, bf16 weights, freezing": compiled("bf16 weights", x1, freezing=True),
    }
    for batch in (1, 8, 16, 32):
        x = inputs(batch)
        log(f"batch {batch}: warming up ({load()})")
        for fn in fns.values():
            for _ in range(3):  # new shape: jit re-profiles, torch.compile recompiles
                fn(x)
        medians = compare({name: (lambda fn=fn, x=x: fn(x)) for name, fn in fns.items()}, seconds)
        report("batch", batch, medians, {}, {name: load() for name in medians})


def section_threads(seconds: float) -> None:
    """Intra-op threads switched per call, round-robin (so the load is shared alike), for three model paths."""
    default = torch.get_num_threads()
    x1 = inputs(1)
    paths = {
        "engine path (eager, bf16 weights, CL)": eager("bf16 weights"),
        "to_mkldnn, bf16 weights": mkldnn_module("bf16 weights"),
        "jit.trace+freeze, bf16 weights, oneDNN graph fusion": jit_frozen("bf16 weights", x1, fusion=True),
    }
    for batch in (1, 8, 16):
        x = inputs(batch)

        def with_threads(fn: Callable, n: int, x: torch.Tensor = x) -> torch.Tensor:
            torch.set_num_threads(n)
            try:
                return fn(x)
            finally:
                torch.set_num_threads(default)

        variants = {}
        for name, fn in paths.items():
            for n in (1, 2):
                label = ENGINE if (n == default and name.startswith("engine")) else f"{name}, {n} thread(s)"
                variants[label] = lambda fn=fn, n=n: with_threads(fn, n)
        for fn in variants.values():
            for _ in range(2):
                fn()
        medians = compare(variants, seconds)
        report("threads", batch, medians, {}, {name: load() for name in medians})


def section_omp_wait(seconds: float, rounds: int = 3) -> None:
    """OMP_WAIT_POLICY must be set before libgomp starts: child processes, alternated over `rounds`."""
    policies = ("default (libgomp spins)", "PASSIVE", "ACTIVE")
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for policy in policies:
            env = dict(os.environ)
            env.pop("OMP_WAIT_POLICY", None)
            if policy in ("PASSIVE", "ACTIVE"):
                env["OMP_WAIT_POLICY"] = policy
            out = subprocess.run(
                [sys.executable, __file__, "--child-omp", str(seconds / rounds)],
                capture_output=True, text=True, check=True, env=env,
            )
            for batch, median in json.loads(out.stdout.strip().splitlines()[-1]).items():
                times.setdefault((policy, int(batch)), []).append(median)
    for batch in (1, 8):
        medians = {f"OMP_WAIT_POLICY {p}": statistics.median(times[(p, batch)]) for p in policies}
        report("omp wait policy", batch, medians, {}, {name: load() for name in medians})


def child_omp(seconds: float) -> None:
    engine = eager("bf16 weights")
    result = {}
    for batch in (1, 8):
        x = inputs(batch)
        engine(x)
        result[batch] = compare({"engine": lambda x=x: engine(x)}, seconds)["engine"]
    print(json.dumps(result))


# -- decoding ------------------------------------------------------------------------------------------


def jpeg(width: int, height: int, seed: int) -> bytes:
    img = draw_shoe(STYLES[seed % 4], list(COLOURS.values())[seed % 8], seed=seed, size=max(width, height))
    buf = io.BytesIO()
    img.resize((width, height)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def section_decode(seconds: float) -> None:
    for w, h in ((400, 400), (1280, 960), (4032, 3024)):
        data = jpeg(w, h, 1)
        variants = {
            f"{w}x{h}, draft_size={draft}": (lambda data=data, draft=draft: preprocess(load_image(data, draft_size=draft), SIZE))
            for draft in (None, SIZE)
        }
        medians = compare(variants, min(seconds, 2.0))
        for name, median in medians.items():
            print(f"| JPEG decode+preprocess | {name} | {1 / median:.1f} | - | - | {median * 1000:.1f} ms/img; {load()} |")


def section_overlap(seconds: float, n: int = 48, batch: int = 16) -> None:
    """Decode (load_image + preprocess) and model one after the other, vs a decode pool feeding the model."""
    datas = [jpeg(400, 400, i) for i in range(n)]
    engine = eager("bf16 weights")

    def decode(d: bytes) -> np.ndarray:
        return preprocess(load_image(d, draft_size=SIZE), SIZE)

    def sequential() -> None:
        arrays = [decode(d) for d in datas]
        for i in range(0, n, batch):
            engine(torch.from_numpy(np.stack(arrays[i : i + batch])))

    def pooled(workers: int, threads: int | None = None) -> None:
        default = torch.get_num_threads()
        torch.set_num_threads(threads or default)
        try:
            with ThreadPoolExecutor(workers) as pool_:
                futures = [pool_.submit(decode, d) for d in datas]
                for i in range(0, n, batch):
                    engine(torch.from_numpy(np.stack([f.result() for f in futures[i : i + batch]])))
        finally:
            torch.set_num_threads(default)

    engine(inputs(batch))
    t0 = time.perf_counter()
    for d in datas:
        decode(d)
    decode_ips = n / (time.perf_counter() - t0)
    medians = compare(
        {
            "sequential": sequential,
            "decode pool of 1": lambda: pooled(1),
            "decode pool of 2 (indexer today)": lambda: pooled(2),
            "decode pool of 2, model on 1 thread": lambda: pooled(2, threads=1),
        },
        seconds,
    )
    for name, median in medians.items():
        print(f"| decode/model overlap | {name}, {n} JPEGs 400px, batch {batch} | {n / median:.2f} | - | - | "
              f"decode alone {decode_ips:.0f} img/s; {load()} |", flush=True)


def packed(precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The engine's path: bf16 (or fp32) weights packed once for oneDNN, ReLUs fused (engine.prepack)."""
    from engine.features import fold_batch_norm
    from engine.prepack import pack_conv_stack

    dtype = torch.bfloat16 if precision == "bf16 weights" else torch.float32
    model = pack_conv_stack(fold_batch_norm(conv_stack()).to(memory_format=CL).to(dtype), SIZE)

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x.contiguous(memory_format=CL).to(dtype)).float()

    return fn


def sizes_and_batches() -> Iterator[tuple[int, int]]:
    """(size, batch) for the index sizes in use (112, 160, 224 px) and batches 1 (a search) and 4 (the
    indexer), with the module's SIZE set to that size meanwhile."""
    global SIZE
    default = SIZE
    try:
        for size in (112, 160, 224):
            SIZE = size
            for batch in (1, 4):
                yield size, batch
    finally:
        SIZE = default


def section_prepack(seconds: float) -> None:
    """Weights packed once for oneDNN (the engine today) against eager convolutions, which hand oneDNN the
    plain weights to reorder on every call."""
    for size, batch in sizes_and_batches():
        x = inputs(batch)
        ref = eager("fp32")(x)
        fns = {ENGINE: eager("bf16 weights"), PACKED: packed("bf16 weights"),
               "prepacked, fp32": packed("fp32"), "eager, fp32, channels_last": eager("fp32")}
        cosines = {name: gem_cosine(ref, fn(x)) for name, fn in fns.items()}
        medians = compare({name: (lambda fn=fn, x=x: fn(x)) for name, fn in fns.items()}, seconds)
        report("prepack", batch, medians, cosines, {name: f"{size} px; {load()}" for name in medians})


def section_cast(seconds: float) -> None:
    """bf16 weights stored once against bf16 autocast over fp32 weights, which casts every weight again on
    each call (inference mode caches no casts): a fixed cost per call, so it shows at batch 1 and small inputs."""
    for size, batch in sizes_and_batches():
        x = inputs(batch)
        fns = {ENGINE: eager("bf16 weights"), "eager, bf16 autocast, channels_last": eager("bf16 autocast")}
        for fn in fns.values():
            fn(x)
        medians = compare({name: (lambda fn=fn, x=x: fn(x)) for name, fn in fns.items()}, seconds)
        report("cast", batch, medians, {}, {name: f"{size} px; {load()}" for name in medians})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per variant")
    parser.add_argument("--skip-compile", action="store_true", help="leave torch.compile out of the model section")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the whole run (default: torch's)")
    parser.add_argument("--child-omp", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_omp:
        child_omp(args.child_omp)
        return
    for name in args.sections.split(","):
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, {load()}\n")
    header()
    for name in args.sections.split(","):
        if name == "model":
            section_model(args.seconds, skip_compile=args.skip_compile)
        else:
            globals()[f"section_{name}"](args.seconds)
    print(f"\ndone, {load()}")


if __name__ == "__main__":
    main()
