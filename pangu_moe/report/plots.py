"""The report's PNG figures (matplotlib, the optional `plot` extra; imported only here).

Every figure takes `runs.Run` objects and a path, and draws only series from `report.runs`, so the
pictures show the same numbers the tables and tests check.
"""
import math

import numpy as np

from pangu_moe.dispatch.topology import Topology
from pangu_moe.report import runs as run_data
from pangu_moe.report.palette import expert_colours
from pangu_moe.report.trace import WIDTH, characters

LINESTYLES = ("-", "--", ":", "-.")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; ImportError when the extra is not installed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    fig.savefig(path, dpi=100, bbox_inches="tight")
    pyplot().close(fig)


def loss_figure(runs, path):
    """Training LM loss and validation loss, both in bits per byte, against the step, one line per run.

    The LM loss (not the total) so that routers with different auxiliary losses compare fairly.
    """
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        steps, lm_loss = run_data.curve(run.records, "lm_loss")
        left.plot(steps, lm_loss / math.log(2), label=run.name)  # nats -> bits
        steps, bpb = run_data.curve(run.records, "val_bpb")
        right.plot(steps, bpb, marker="o", label=run.name)
    left.set(title="training LM loss", xlabel="step", ylabel="bits per byte")
    right.set(title="validation", xlabel="step", ylabel="val bpb (bits per byte)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def routing_figure(runs, path):
    """Dropped fraction, inter-node fraction and capacity per logged step; one colour per run, one line
    style per MoE layer for the capacity."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        steps = run_data.layer_steps(run.records)
        axes[0].plot(steps, 100 * run_data.dropped_fraction(run.records), color=colour, label=run.name)
        axes[1].plot(steps, run_data.inter_node_fraction(run.records), color=colour, label=run.name)
        for layer, capacity in enumerate(run_data.capacities(run.records).T):
            axes[2].plot(steps, capacity, color=colour, linestyle=LINESTYLES[layer % len(LINESTYLES)],
                         label=f"{run.name} layer {layer}")
    axes[0].set(title="dropped choices", xlabel="step", ylabel="dropped / requested (%)")
    axes[1].set(title="tokens crossing nodes", xlabel="step", ylabel="inter-node / kept choices", ylim=(0, 1))
    axes[2].set(title="capacity", xlabel="step", ylabel="C (slots per expert per rank)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    _save(fig, path)


def load_figure(run, path):
    """Per MoE layer, a heatmap of each expert's demand over the fair share against the step; lines
    separate the experts of different nodes."""
    plt = pyplot()
    layers = run_data.num_moe_layers(run.records)
    steps = run_data.layer_steps(run.records)
    nodes = _expert_nodes(run)
    fig, axes = plt.subplots(layers, 1, figsize=(10, (1.2 + 0.35 * len(nodes)) * layers), squeeze=False)
    for layer, ax in enumerate(axes[:, 0]):
        load = run_data.expert_load(run.records, layer)  # (n steps, E)
        image = ax.imshow(load.T, aspect="auto", origin="lower", cmap="viridis", vmin=0,
                          vmax=max(2.0, float(load.max())), interpolation="nearest",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, load.shape[1] - 0.5)
                          if len(steps) > 1 else None)
        for boundary in np.nonzero(np.diff(nodes))[0]:
            ax.axhline(boundary + 0.5, color="white", linewidth=1.5)
        ax.set(title=f"{run.name}: MoE layer {layer} expert load", xlabel="step", ylabel="expert (node)")
        ax.set_yticks(range(load.shape[1]), [f"{e} (n{n})" for e, n in enumerate(nodes)])
        fig.colorbar(image, ax=ax, label="demand / fair share")
    fig.tight_layout()
    _save(fig, path)


def _expert_nodes(run):
    experts = len(run.records[0]["layers"][0]["tokens_per_expert"])
    if run.config is None:
        return np.zeros(experts, np.int64)
    p = run.config.parallel
    return Topology(p.nodes, p.devices_per_node, experts).expert_node()


FIGURE_FALLBACK = "\u25a1"  # drawn for characters matplotlib's default font lacks (CJK, emoji)


def figure_glyph(glyph):
    """The glyph as the figure draws it: itself if matplotlib's bundled DejaVu fonts cover it (scripts below the
    CJK blocks), else `FIGURE_FALLBACK`; the terminal rendering (`report.trace.render`) shows every character."""
    return glyph if ord(glyph[0]) < 0x2e80 else FIGURE_FALLBACK


def trace_figure(trace, title, path, width=WIDTH):
    """The text of a generation trace in rows of `width` characters (`report.trace.characters`), one band of cells
    per MoE layer, each cell coloured by its token's first-choice expert (hatched where dropped); the prompt is
    faded."""
    plt = pyplot()
    from matplotlib.patches import Patch, Rectangle
    index, keep = trace["expert_index"], trace["keep"]
    cells = characters(trace)
    layers, colours = len(index), expert_colours(trace["expert_node"])
    chunks = (len(cells) + width - 1) // width
    band = layers + 0.6  # one row per layer plus a gap between chunks
    fig, ax = plt.subplots(figsize=(0.2 * width + 1, 0.3 * band * chunks + 1.2))
    for i, (glyph, token) in enumerate(cells):
        chunk, column = divmod(i, width)
        for layer in range(layers):
            y = -(chunk * band + layer)
            ax.add_patch(Rectangle((column, y), 1, 1, facecolor=colours[index[layer][token][0]],
                                   alpha=0.45 if token < trace["prompt_bytes"] else 1.0,
                                   hatch=None if keep[layer][token][0] else "xx", edgecolor="white", linewidth=0.3))
            ax.text(column + 0.5, y + 0.5, figure_glyph(glyph), ha="center", va="center", fontsize=7,
                    family="monospace")
    ax.set_xlim(0, width)
    ax.set_ylim(-((chunks - 1) * band + layers - 1), 1)  # from the last chunk's last layer row to the top
    ax.set_yticks([-(c * band + l) + 0.5 for c in range(chunks) for l in range(layers)],
                  [f"L{l}" for _ in range(chunks) for l in range(layers)], fontsize=7)
    ax.set_xticks([])
    ax.set_title(f"{title}: first-choice expert of each character per MoE layer (faded: prompt, hatched: dropped, "
                 f"{FIGURE_FALLBACK}: a character the font lacks)")
    handles = [Patch(facecolor=c, label=f"expert {e} (node {n})")
               for e, (c, n) in enumerate(zip(colours, trace["expert_node"]))]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    _save(fig, path)
