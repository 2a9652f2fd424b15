"""The report's PNG figures (matplotlib, the optional `plot` extra; imported only here).

Every figure takes `runs.Run` objects and a path, and draws only series from `report.runs`, so the
pictures show the same numbers the tables and tests check.
"""
import math

import numpy as np

from pangu_moe.report import runs as run_data
from pangu_moe.report.palette import expert_colours, expert_groups
from pangu_moe.report.trace import WIDTH, characters, expert_labels

LINESTYLES = ("-", "--", ":", "-.")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; ImportError when the extra is not installed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    """Write `fig` to `path` and release it; returns `fig` (its axes and labels stay readable)."""
    fig.savefig(path, dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return fig


def loss_figure(runs, path):
    """Training LM loss in bits per token (per byte when every run uses the byte tokenizer: `runs.token_unit`)
    and validation bits per byte, against the step, one line per run; returns the figure.

    The LM loss (not the total) so that routers with different auxiliary losses compare fairly.
    """
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        steps, lm_loss = run_data.curve(run.records, "lm_loss")
        left.plot(steps, lm_loss / math.log(2), label=run.name)  # nats -> bits
        steps, bpb = run_data.curve(run.records, "val_bpb")
        right.plot(steps, bpb, marker="o", label=run.name)
    unit = run_data.token_unit(runs)
    left.set(title="training LM loss", xlabel="step",
             ylabel="bits per byte (byte tokenizer: a token is a byte)" if unit == "byte" else "bits per token")
    right.set(title="validation", xlabel="step", ylabel="val bpb (bits per byte)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


ROUTING_PANELS = (("dropped choices", "dropped / requested (%)"),
                  ("tokens crossing nodes", "inter-node / kept choices"),
                  ("capacity", "C (slots per expert per rank)"))


def routing_series(run):
    """[(panel index, label, MoE layer, steps, values)] of `routing_figure` for one run: dropped %, inter-node
    fraction (layer 0: over all layers), and the capacity of each MoE layer."""
    steps = run_data.layer_steps(run.records)
    series = [(0, run.name, 0, steps, 100 * run_data.dropped_fraction(run.records)),
              (1, run.name, 0, steps, run_data.inter_node_fraction(run.records))]
    for layer, capacity in enumerate(run_data.capacities(run.records).T):
        series.append((2, f"{run.name} layer {layer}", layer, steps, capacity))
    return series


def constant_panels(runs):
    """{panel index: the value} of the `ROUTING_PANELS` whose every series over every run holds one value."""
    values = {}
    for run in runs:
        for panel, _, _, _, series in routing_series(run):
            values.setdefault(panel, set()).update(np.asarray(series, np.float64).tolist())
    return {panel: seen.pop() for panel, seen in values.items() if len(seen) == 1}


def routing_figure(runs, path):
    """Dropped fraction, inter-node fraction and capacity per logged step; one colour per run, one line style per
    MoE layer for the capacity. A panel whose series all hold one value is left out and named in the title."""
    plt = pyplot()
    constant = constant_panels(runs)
    shown = [p for p in range(len(ROUTING_PANELS)) if p not in constant]
    if not shown:
        shown = [0]  # one panel, so the figure still exists and its title lists the constants
    fig, axes = plt.subplots(1, len(shown), figsize=(5.3 * len(shown) + 0.5, 4), squeeze=False)
    axes = dict(zip(shown, axes[0]))
    for i, run in enumerate(runs):
        for panel, label, layer, steps, values in routing_series(run):
            if panel in axes:
                axes[panel].plot(steps, values, color=f"C{i % 10}", label=label,
                                 linestyle=LINESTYLES[layer % len(LINESTYLES)])
    for panel, ax in axes.items():
        title, ylabel = ROUTING_PANELS[panel]
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if constant:
        fig.suptitle("constant, not drawn: " + "; ".join(f"{ROUTING_PANELS[p][0]} = {v:g}"
                                                         for p, v in sorted(constant.items())), fontsize="small")
    _save(fig, path)


def load_figure(run, path):
    """Per MoE layer, a heatmap of each expert's demand over the fair share against the step; lines
    separate the experts of different nodes. Each layer's experts are drawn in the order of their nodes after the
    last logged step (`runs.final_expert_nodes`: expert order unless the run placed its experts); the level-1
    groups are marked where that is expert order, and named in the labels."""
    plt = pyplot()
    layers = run_data.num_moe_layers(run.records)
    steps = run_data.layer_steps(run.records)
    num_experts = len(run.records[0]["layers"][0]["tokens_per_expert"])
    groups = expert_groups(num_experts, run.config.moe.num_groups if run.config else 1)
    fig, axes = plt.subplots(layers, 1, figsize=(10, (1.2 + 0.35 * num_experts) * layers), squeeze=False)
    for layer, ax in enumerate(axes[:, 0]):
        nodes = run_data.final_expert_nodes(run, layer)
        order = np.argsort(nodes, kind="stable")  # row i draws expert order[i]
        load = run_data.expert_load(run.records, layer)[:, order]  # (n steps, E) in row order
        image = ax.imshow(load.T, aspect="auto", origin="lower", cmap="viridis", vmin=0,
                          vmax=max(2.0, float(load.max())), interpolation="nearest",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, load.shape[1] - 0.5)
                          if len(steps) > 1 else None)
        for boundary in np.nonzero(np.diff(nodes[order]))[0]:
            ax.axhline(boundary + 0.5, color="white", linewidth=1.5)
        reordered = not np.array_equal(order, np.arange(num_experts))
        if not reordered:
            for boundary in np.nonzero(np.diff(groups))[0]:
                ax.axhline(boundary + 0.5, color="red", linewidth=1.5, linestyle="--")
        where = "white: node boundary, experts by their node at the last step" if reordered else \
            "white: node boundary, red dashed: level-1 group"
        ax.set(title=f"{run.name}: MoE layer {layer} expert load ({where})", xlabel="step", ylabel="expert")
        labels = expert_labels({"expert_node": nodes.tolist(), "num_groups": max(groups) + 1})
        ax.set_yticks(range(load.shape[1]), [labels[e] for e in order])
        fig.colorbar(image, ax=ax, label="demand / fair share")
    fig.tight_layout()
    _save(fig, path)
    return fig


def placement_figure(run, path, first):
    """Per MoE layer, the rank hosting each expert over the run (`runs.placement_series` from `first`, the map
    it started from): one row per expert, coloured by rank, a column from each placement's step on."""
    plt = pyplot()
    steps, ranks = run_data.placement_series(run.records, first)
    last = max(int(steps[-1]) + 1, run_data.layer_steps(run.records)[-1] if run_data.num_moe_layers(run.records)
               else 0)
    edges = np.append(steps, last)  # column j spans steps [edges[j], edges[j + 1])
    world = int(ranks.max()) + 1
    fig, axes = plt.subplots(len(ranks), 1, figsize=(10, (1.2 + 0.35 * ranks.shape[2]) * len(ranks)), squeeze=False)
    for layer, ax in enumerate(axes[:, 0]):
        image = ax.pcolormesh(edges, np.arange(ranks.shape[2] + 1) - 0.5, ranks[layer].T,
                              cmap=plt.get_cmap("tab10", world), vmin=-0.5, vmax=world - 0.5)
        ax.set(title=f"{run.name}: MoE layer {layer}, the rank hosting each expert", xlabel="step", ylabel="expert")
        fig.colorbar(image, ax=ax, label="rank", ticks=range(world))
    fig.tight_layout()
    _save(fig, path)
    return fig


FIGURE_FALLBACK = "\u25a1"  # drawn for characters no installed font covers (CJK without a CJK font, emoji)
# System fonts that cover the CJK blocks, first found wins (matplotlib bundles only DejaVu, which does not).
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans SC", "Source Han Sans SC",
             "Source Han Sans CN", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei",
             "PingFang SC", "Hiragino Sans GB", "AR PL UMing CN")


def cjk_font(names=None):
    """The first of `CJK_FONTS` among `names` (default: the fonts matplotlib found on this machine), or None."""
    if names is None:
        from matplotlib import font_manager
        names = {font.name for font in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in names), None)


def figure_glyph(glyph, cjk=None):
    """(text, font family) the figure draws for `glyph`: itself in monospace if matplotlib's bundled DejaVu fonts
    cover it (scripts below the CJK blocks); from the block up, itself in the CJK font `cjk` when one is installed,
    else `FIGURE_FALLBACK`. The terminal rendering (`report.trace.render`) shows every character."""
    if ord(glyph[0]) < 0x2e80:
        return glyph, "monospace"
    return (glyph, cjk) if cjk else (FIGURE_FALLBACK, "monospace")


def trace_figure(trace, title, path, width=WIDTH):
    """The text of a generation trace in rows of `width` characters (`report.trace.characters`), one band of cells
    per MoE layer, each cell coloured by its token's first-choice expert (hatched where dropped); the prompt is
    faded."""
    plt = pyplot()
    from matplotlib.patches import Patch, Rectangle
    index, keep = trace["expert_index"], trace["keep"]
    cells = characters(trace)
    layers, colours = len(index), expert_colours(len(trace["expert_node"]))
    chunks = (len(cells) + width - 1) // width
    band = layers + 0.6  # one row per layer plus a gap between chunks
    fig, ax = plt.subplots(figsize=(0.2 * width + 1, 0.3 * band * chunks + 1.2))
    cjk = cjk_font()
    for i, (glyph, token) in enumerate(cells):
        chunk, column = divmod(i, width)
        for layer in range(layers):
            y = -(chunk * band + layer)
            ax.add_patch(Rectangle((column, y), 1, 1, facecolor=colours[index[layer][token][0]],
                                   alpha=0.45 if token < trace["prompt_bytes"] else 1.0,
                                   hatch=None if keep[layer][token][0] else "xx", edgecolor="white", linewidth=0.3))
            text, family = figure_glyph(glyph, cjk)
            ax.text(column + 0.5, y + 0.5, text, ha="center", va="center", fontsize=7, family=family)
    ax.set_xlim(0, width)
    ax.set_ylim(-((chunks - 1) * band + layers - 1), 1)  # from the last chunk's last layer row to the top
    ax.set_yticks([-(c * band + l) + 0.5 for c in range(chunks) for l in range(layers)],
                  [f"L{l}" for _ in range(chunks) for l in range(layers)], fontsize=7)
    ax.set_xticks([])
    ax.set_title(f"{title}: first-choice expert of each character per MoE layer (faded: prompt, hatched: dropped"
                 + ("" if cjk else f", {FIGURE_FALLBACK}: a character the fonts lack; a CJK font such as "
                                   f"fonts-noto-cjk draws Chinese") + ")")
    handles = [Patch(facecolor=c, label=label) for c, label in zip(colours, expert_labels(trace))]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    _save(fig, path)
