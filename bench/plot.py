"""Draw bench/*.png from bench/results.json (run with bench/.venv's matplotlib)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib  # type: ignore[import-not-found, unused-ignore]

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

BENCH = Path(__file__).resolve().parent
MIB = 1024 * 1024


def ok(s: Any) -> bool:
    return isinstance(s, dict) and s.get("n", 0) > 0


def bars(ax: Any, items: list[tuple[str, Any, float]], unit: str) -> None:
    """Median bars with min-max whiskers; items are (label, stat, scale)."""
    items = [(label, s, k) for label, s, k in items if ok(s)]
    med = [s["median"] * k for _, s, k in items]
    lo = [(s["median"] - s["min"]) * k for _, s, k in items]
    hi = [(s["max"] - s["median"]) * k for _, s, k in items]
    y = range(len(items))
    ax.barh(list(y), med, xerr=[lo, hi], color="#4c72b0", capsize=3)
    ax.set_yticks(list(y), [label for label, _, _ in items])
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    for i, v in enumerate(med):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)


def summed(a: Any, b: Any) -> Any:
    if not (ok(a) and ok(b)):
        return {"n": 0}
    vals = sorted(x + y for x, y in zip(a["values"], b["values"], strict=False))
    mid = len(vals) // 2
    med = vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
    return {"n": len(vals), "median": med, "min": vals[0], "max": vals[-1], "values": vals}


def main() -> int:
    r = json.loads((BENCH / "results.json").read_text())
    b6, py, d6 = r.get("pvpy_boot6", {}), r.get("python", {}), r.get("docker_boot6", {})
    fig, ax = plt.subplots(figsize=(8, 3.6))
    bars(
        ax,
        [
            ("pvpy PID 1", b6.get("pid1_pss"), 1 / MIB),
            (
                "pvpy PID 1 + 6 crun monitors",
                summed(b6.get("pid1_pss"), b6.get("monitors_pss")),
                1 / MIB,
            ),
            ("bare python3", py.get("bare", {}).get("pss"), 1 / MIB),
            ("dockerd + containerd", d6.get("engine_pss"), 1 / MIB),
            (
                "dockerd + containerd + 6 shims",
                summed(d6.get("engine_pss"), d6.get("shims_pss")),
                1 / MIB,
            ),
        ],
        "PSS, MiB (median, min-max)",
    )
    ax.set_title("Supervisor memory, idle, host OS + 5 apps")
    fig.tight_layout()
    fig.savefig(BENCH / "memory.png", dpi=110)

    rt, dr = r.get("runtimes", {}), r.get("docker_run", {})
    fig, ax = plt.subplots(figsize=(8, 3.2))
    bars(
        ax,
        [
            ("crun run", rt.get("crun", {}).get("stamp"), 1000),
            ("runc run", rt.get("runc", {}).get("stamp"), 1000),
            ("pvpy (mounts + crun)", b6.get("start_to_running"), 1000),
            ("docker run --rm", dr.get("stamp"), 1000),
        ],
        "command → process running, ms (median, min-max)",
    )
    ax.set_title("Container start latency")
    fig.tight_layout()
    fig.savefig(BENCH / "start.png", dpi=110)

    sc, ds = r.get("scale", {}), r.get("docker_scale", {})
    if isinstance(sc, dict) and "error" not in sc and sc:
        ns = [int(n) for n in sc if n.isdigit()]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
        a1.plot(
            ns,
            [sc[str(n)]["boot_containers"].get("median", 0) for n in ns],
            "o-",
            label="pvpy (all containers)",
        )
        dn = [n for n in ns if str(n) in ds and isinstance(ds[str(n)], dict)]
        if dn:
            a1.plot(dn, [ds[str(n)]["start_total"] for n in dn], "s-", label="docker run x (N+1)")
        a1.set_xlabel("apps (N)")
        a1.set_ylabel("start all, s")
        a1.legend()
        a1.set_title("Start time vs containers")
        a2.plot(
            ns,
            [sc[str(n)]["pid1_pss"].get("median", 0) / MIB for n in ns],
            "o-",
            label="pvpy PID 1",
        )
        a2.plot(
            ns,
            [
                (
                    sc[str(n)]["pid1_pss"].get("median", 0)
                    + sc[str(n)]["monitors_pss"].get("median", 0)
                )
                / MIB
                for n in ns
            ],
            "o--",
            label="pvpy PID 1 + crun monitors",
        )
        if dn:
            a2.plot(
                dn, [ds[str(n)]["engine_pss"] / MIB for n in dn], "s-", label="dockerd + containerd"
            )
            a2.plot(
                dn,
                [(ds[str(n)]["engine_pss"] + ds[str(n)]["shims_pss"]) / MIB for n in dn],
                "s--",
                label="dockerd + containerd + shims",
            )
        a2.set_xlabel("apps (N)")
        a2.set_ylabel("PSS, MiB")
        a2.legend(fontsize=8)
        a2.set_title("Supervisor memory vs containers")
        fig.tight_layout()
        fig.savefig(BENCH / "scale.png", dpi=110)
    print("wrote", ", ".join(p.name for p in sorted(BENCH.glob("*.png"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
