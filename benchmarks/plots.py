"""PNG plots of the offline results (throughput.py, sharing.py, memory.py), written next to
their JSON. serving.py and fastchat_worker.py draw their own.

    python benchmarks/plots.py [benchmarks/results/throughput-cpu.json ...]

With no argument, plots every throughput-*.json, sharing-*.json and memory-*.json under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import RESULTS_DIR  # noqa: E402


def machine_line(result: dict) -> str:
    machine = result["machine"]
    return f"{machine['cpu']}, {machine['cores']} cores, GPU {machine['gpu']}"


def plot_throughput(result: dict, path: Path) -> None:
    systems = {"pagoda LLM.generate": result["pagoda"]["tokens_per_s"]}
    for key, label in (("transformers_static", "transformers generate\n(static batches)"),
                       ("transformers_continuous", "transformers\ngenerate_batch")):
        if key in result:
            systems[label] = result[key]["tokens_per_s"]
    figure, axis = plt.subplots(figsize=(7, 4.2))
    bars = axis.bar(list(systems), list(systems.values()),
                    color=["tab:blue", "tab:grey", "tab:olive"][: len(systems)])
    pagoda = result["pagoda"]["tokens_per_s"]
    axis.bar_label(bars, [f"{v:.0f} ({pagoda / v:.1f}x)" if v != pagoda else f"{v:.0f}"
                          for v in systems.values()])
    axis.set_ylabel("useful output tokens/s")
    axis.set_title(f"Offline throughput, {result['num_requests']} ShareGPT-like requests "
                   f"(KV waste at peak {result['kv_waste_at_peak']:.1%})\n{machine_line(result)}",
                   fontsize=9)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


PEER_LABELS = {"transformers_static": "transformers generate (static batches)",
               "transformers_continuous": "transformers generate_batch"}


def plot_fixed_lengths(result: dict, path: Path) -> None:
    """Grouped bars per (input, output) pair: Pagoda and each peer, Pagoda's ratio on top."""
    points = result["points"]
    systems = {"pagoda": "pagoda LLM.generate"} | {
        key: label for key, label in PEER_LABELS.items() if key in points[0]}
    width = 0.8 / len(systems)
    figure, axis = plt.subplots(figsize=(max(7, 1.6 * len(points)), 4.2))
    for offset, (key, label) in enumerate(systems.items()):
        positions = [i + (offset - (len(systems) - 1) / 2) * width for i in range(len(points))]
        bars = axis.bar(positions, [p[key]["tokens_per_s"] for p in points], width, label=label)
        if key != "pagoda":
            axis.bar_label(bars, [f"{p[key]['pagoda_speedup']:.1f}x" for p in points], fontsize=8)
    axis.set_xticks(range(len(points)), [f"{p['input_len']} in\n{p['output_len']} out"
                                         for p in points])
    axis.set_ylabel("useful output tokens/s")
    axis.set_title(f"Offline throughput, fixed lengths, {result['num_requests']} requests per "
                   f"pair (labels: Pagoda's ratio)\n{machine_line(result)}", fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_memory(result: dict, path: Path) -> None:
    """Peak KV blocks, shared against unshared, and KV waste at peak, per workload."""
    workloads = result["workloads"]
    names = list(workloads)
    positions = range(len(names))
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    axes[0].bar([p - 0.2 for p in positions], [workloads[n]["peak_unshared_blocks"] for n in names],
                0.4, label="unshared (a copy per live sequence)", color="tab:grey")
    bars = axes[0].bar([p + 0.2 for p in positions], [workloads[n]["peak_used_blocks"] for n in names],
                       0.4, label="used (shared)", color="tab:blue")
    axes[0].bar_label(bars, [f"{workloads[n]['fewer_blocks']:.0%} fewer" for n in names], fontsize=8)
    axes[0].set_title("peak KV blocks")
    axes[0].legend(fontsize=8)
    bars = axes[1].bar(names, [workloads[n]["kv_waste_at_peak"] for n in names], color="tab:blue")
    axes[1].bar_label(bars, [f"{workloads[n]['kv_waste_at_peak']:.1%}" for n in names])
    axes[1].axhline(0.04, color="grey", linestyle=":", label="target 4%")
    axes[1].set_title("KV waste at peak (1 - tokens / slots of used blocks)")
    axes[1].legend(fontsize=8)
    for axis in axes:
        axis.set_xticks(list(positions), names, fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"KV memory, block size {result['block_size']}, peak RSS "
                    f"{result['peak_rss_mib']:.0f} MiB - {machine_line(result)}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_sharing(result: dict, path: Path) -> None:
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    memory = result["memory"]
    kinds = ["parallel_sampling_n4", "beam_search_width4"]
    positions = range(len(kinds))
    axes[0].bar([p - 0.2 for p in positions], [memory[k]["peak_blocks_unshared"] for k in kinds],
                0.4, label="unshared (a copy each)", color="tab:grey")
    axes[0].bar([p + 0.2 for p in positions], [memory[k]["peak_blocks_shared"] for k in kinds],
                0.4, label="shared (fork + copy-on-write)", color="tab:blue")
    axes[0].set_xticks(list(positions), [f"{k}\n{memory[k]['fewer_blocks']:.0%} fewer"
                                         for k in kinds])
    axes[0].set_title("peak KV blocks")
    axes[0].legend(fontsize=8)
    same = result["throughput_same_kv_budget"]
    bars = axes[1].bar(["n=4 shared", "4 independent"],
                       [same["shared"]["tokens_per_s"], same["unshared"]["tokens_per_s"]],
                       color=["tab:blue", "tab:grey"])
    axes[1].bar_label(bars, fmt="%.0f")
    axes[1].set_title(f"tokens/s at {same['num_kv_blocks']} KV blocks ({same['speedup']:.2f}x)")
    ttft = result["prefix_caching_ttft"]
    bars = axes[2].bar(["cache off", "cache on"],
                       [ttft["ttft_median_s_cache_off"], ttft["ttft_median_s_cache_on"]],
                       color=["tab:grey", "tab:blue"])
    axes[2].bar_label(bars, fmt="%.3f s")
    axes[2].set_title(f"TTFT after a {ttft['prefix_tokens']}-token shared prefix "
                      f"({ttft['speedup']:.1f}x)")
    for axis in axes:
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"KV sharing - {machine_line(result)}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_file(path: Path) -> Path:
    result = json.loads(path.read_text())
    target = path.with_suffix(".png")
    benchmark = result.get("benchmark", "")
    if benchmark == "offline throughput, fixed lengths":
        plot_fixed_lengths(result, target)
    elif benchmark.startswith("offline throughput"):
        plot_throughput(result, target)
    elif benchmark == "prefix sharing":
        plot_sharing(result, target)
    elif benchmark == "KV memory":
        plot_memory(result, target)
    else:
        raise ValueError(f"{path}: not a result of throughput.py, sharing.py or memory.py")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", help="result JSON files (default: all of results/)")
    paths = [Path(p) for p in parser.parse_args().results] or sorted(
        [*RESULTS_DIR.glob("throughput-*.json"), *RESULTS_DIR.glob("sharing-*.json"),
         *RESULTS_DIR.glob("memory-*.json")])
    for path in paths:
        print(f"wrote {plot_file(path)}")


if __name__ == "__main__":
    main()
