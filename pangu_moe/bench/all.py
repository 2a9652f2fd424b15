"""`pangu-moe bench all`: every benchmark in one run, one table of ratios and the machine description.

The MoE layer against a dense FFN (`bench.moe_layer`), one-hot against index-gather dispatch
(`bench.dispatch_style`), the custom kernels against the reference (`bench.kernels`) and the
simulated expert-parallel backend against local (`bench.ep`), run one after the other in this process
(ep also launches its msrun run) so the ratios come from one sitting of the machine.
"""
import os
import platform

import mindspore as ms

RATIOS = (("moe_over_dense", "moe_layer", "MoE layer / dense FFN, forward+backward time", "<= 1.0"),
          ("onehot_over_gather", "dispatch_style", "one-hot / index-gather dispatch+combine, forward+backward", "> 1"),
          ("kernel_speedup", "kernels", "reference / custom kernels, geometric mean over 8 shapes", "> 1"),
          ("permute_bw_fraction", "kernels", "custom permute+unpermute bandwidth / plain copy, worst shape", ">= 0.4"),
          ("simulated_over_local", "ep", "simulated 2x2 expert parallelism / local, train step", "~ 1"),
          ("ragged_over_padded_bytes", "ep", "ragged / padded exchange bytes, Switch at capacity factor 1.25",
           "<= 0.75"))


def machine():
    """One line: architecture, cores, Python and MindSpore versions."""
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"MindSpore {ms.__version__}")


def run(repeats=5, benches=None, log=print):
    """Run every benchmark; returns {ratio name: value, ..., "machine": str, "results": {bench: its dict}}.

    `benches`: {name: callable(repeats) -> result dict}, default the four benchmark modules.
    """
    if benches is None:
        from pangu_moe.progress import Progress
        from pangu_moe.bench import dispatch_style, ep, kernels, moe_layer

        def progress(name):
            return Progress(name, "runs", log=log).update

        benches = {"moe_layer": lambda r: moe_layer.run(repeats=r, progress=progress("moe-layer")),
                   "dispatch_style": lambda r: dispatch_style.run(repeats=r, progress=progress("dispatch")),
                   "kernels": lambda r: kernels.run(repeats=r, log=log),
                   "ep": lambda r: ep.run(repeats=r, log=log)}
    results = {}
    for name, bench in benches.items():
        log(f"bench {name} ...")
        results[name] = bench(repeats)
    summary = {ratio: results[bench][ratio] for ratio, bench, _, _ in RATIOS}
    return {**summary, "machine": machine(), "repeats": repeats, "results": results}


def table(result):
    """Human-readable lines for `run`'s result."""
    lines = [f"pangu-moe bench all ({result['machine']}; medians of {result['repeats']} runs)",
             f"  {'ratio':22s} {'value':>8s}  {'target':8s} what"]
    for ratio, _, what, target in RATIOS:
        lines.append(f"  {ratio:22s} {result[ratio]:8.3f}  {target:8s} {what}")
    return "\n".join(lines)
