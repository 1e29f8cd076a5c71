"""Each image's size and its cold and warm build times; prints a table and writes benchmarks/results/images.md.

    python benchmarks/images.py --base-image local/debian:bookworm-slim --extra-ca /etc/ssl/certs/ca-certificates.crt
    python benchmarks/images.py --warm-only ...     # keep the build cache: warm builds and sizes only

Cold: the BuildKit cache is emptied (`docker builder prune -af`) and the benchmark's images removed, then the
images are built in `olivepress docker build`'s order, one at a time; quantize pays for the shared torch layer,
finetune and optimize reuse it, as any fresh build of them all does. Warm: the same builds again on an unchanged
checkout. Goals (issue 3): the slim images (infer, server) at most 200 MB each with no torch in them; a warm
rebuild of every image under 10 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from olivepress.docker import build as images  # noqa: E402
from olivepress.docker import engine  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SLIM_GOAL_MB = 200
SLIM_IMAGES = ("infer", "server")
WARM_GOAL_S = 10


def build_once(name: str, ref: str, args: argparse.Namespace, labels: dict[str, str]) -> float:
    cmd = images.build_command(
        images.IMAGES[name], ref, base_image=args.base_image, extra_ca=args.extra_ca, labels=labels, progress="quiet"
    )
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"building {ref} failed:\n{done.stderr[-4000:]}")
    return seconds


def shared_bytes(args: argparse.Namespace, client: object) -> int:
    """Size of the `build` stage of cuda.Dockerfile: the layers all three CUDA images are built FROM."""
    ref = images.image_ref("cuda-build-stage", "olivepress", args.tag)
    cmd = images.build_command(
        images.Image("build", "docker/cuda.Dockerfile", "build"),
        ref,
        base_image=args.base_image,
        extra_ca=args.extra_ca,
        progress="quiet",
    )
    subprocess.run(cmd, capture_output=True, check=True)  # cached: it was just built as part of quantize
    size = client.images.get(ref).attrs["Size"]  # type: ignore[attr-defined]
    subprocess.run(["docker", "image", "rm", ref], capture_output=True)  # only the tag: the layers stay in use
    return size


def has_torch(client: object, ref: str) -> bool:
    probe = "import importlib.util as u; print(bool(u.find_spec('torch') or u.find_spec('transformers')))"
    out = client.containers.run(ref, entrypoint=["python", "-c", probe], remove=True)  # type: ignore[attr-defined]
    return out.decode().strip() == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-image", default=images.DEFAULT_BASE_IMAGE)
    parser.add_argument("--extra-ca", type=Path)
    parser.add_argument("--tag", default="bench", help="tag of the benchmark's images (default: bench)")
    parser.add_argument("--warm-only", action="store_true", help="keep the build cache: no cold builds")
    parser.add_argument("--out", type=Path, default=RESULTS / "images.md")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark's images (default: remove them)")
    args = parser.parse_args()

    client = engine.client()
    engine.require_cli("buildx")
    labels = images.provenance()
    names = list(images.IMAGES)
    refs = {n: images.image_ref(n, "olivepress", args.tag) for n in names}
    cold: dict[str, float] = {}
    if not args.warm_only:
        for ref in refs.values():
            subprocess.run(["docker", "image", "rm", "-f", ref], capture_output=True)
        subprocess.run(["docker", "builder", "prune", "-af"], capture_output=True, check=True)
        for n in names:
            cold[n] = build_once(n, refs[n], args, labels)
            print(f"cold  {refs[n]:32} {cold[n]:7.1f} s", flush=True)
    else:
        for n in names:  # make sure they exist, so the timed run below is warm
            build_once(n, refs[n], args, labels)
    warm = {}
    for n in names:
        warm[n] = build_once(n, refs[n], args, labels)
        print(f"warm  {refs[n]:32} {warm[n]:7.1f} s", flush=True)
    sizes = {n: client.images.get(refs[n]).attrs["Size"] for n in names}
    shared = shared_bytes(args, client)
    slim_torch = {n: has_torch(client, refs[n]) for n in SLIM_IMAGES}

    rows = [
        f"| {refs[n]} | {images.human_size(sizes[n])} | {f'{cold[n]:.1f}' if n in cold else '–'} | {warm[n]:.1f} |"
        for n in names
    ]
    warm_total = sum(warm.values())
    cold_total = sum(cold.values())
    engine_version = client.version()
    command = " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv])
    report = "\n".join(
        [
            "# Image sizes and build times",
            "",
            f"Made by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, revision "
            f"{labels['REVISION'][:12]}, {platform.machine()} with {_cpus()} CPUs, Docker engine "
            f"{engine_version['Version']} (API {engine_version['ApiVersion']}), base image `{args.base_image}`.",
            "",
            "| image | size | cold build s | warm build s |",
            "| --- | ---: | ---: | ---: |",
            *rows,
            f"| **all** | | {f'{cold_total:.1f}' if cold else '–'} | {warm_total:.1f} |",
            "",
            f"- The three CUDA images are built FROM one {images.human_size(shared)} stage (base, Python, the locked "
            "torch stack): stored once on disk, pulled once.",
            *(
                f"- Slim image {n}: {sizes[n] / 1e6:.1f} MB (goal ≤ {SLIM_GOAL_MB} MB: "
                f"{'met' if sizes[n] / 1e6 <= SLIM_GOAL_MB else 'MISSED'}), torch or transformers in it: "
                f"{'YES (goal missed)' if slim_torch[n] else 'no'}."
                for n in SLIM_IMAGES
            ),
            f"- Warm rebuild of every image on an unchanged checkout: {warm_total:.1f} s (goal < {WARM_GOAL_S} s: "
            f"{'met' if warm_total < WARM_GOAL_S else 'MISSED'}).",
            "- Cold: empty BuildKit cache, images built in order; finetune and optimize reuse the torch layer "
            "that quantize built (PyPI download through this network included).",
            "",
        ]
    )
    print()
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "command": command,
                "revision": labels["REVISION"],
                "sizes": sizes,
                "cold_s": cold,
                "warm_s": warm,
                "shared_bytes": shared,
                "slim_has_torch": slim_torch,
            },
            indent=2,
        )
        + "\n"
    )
    if not args.keep:  # a second copy of ~6 GB of CUDA layers would otherwise stay on disk
        for ref in refs.values():
            subprocess.run(["docker", "image", "rm", ref], capture_output=True)
    print(f"wrote {args.out.relative_to(REPO)} and {args.out.with_suffix('.json').relative_to(REPO)}")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    main()
