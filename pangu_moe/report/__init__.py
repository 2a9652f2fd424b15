"""`pangu-moe report`: figures and a summary table for one or several run directories.

`write(runs, out)` writes OUT/report.md (the table, the figures it links), OUT/report.json (the same
numbers) and, when matplotlib is installed (`pip install 'pangu_moe[plot]'`), the PNGs:
loss.png, routing.png (dropped, inter-node, capacity), load_<run>.png per run (expert-load heatmap per
MoE layer), placement_<run>.png for runs that re-placed their experts (the rank of each expert over the
steps) and trace_<run>.png for runs holding a generation trace.
"""
import json
import os

from pangu_moe.progress import Progress
from pangu_moe.report import runs as run_data
from pangu_moe.report.tables import markdown, summary_row

PLOT_HINT = "matplotlib is not installed; wrote the tables only. For the figures: pip install 'pangu_moe[plot]' " \
            "(or pip install matplotlib)"


def figures(runs):
    """[(file name, caption, draw(path))] of the report's figures for `runs`; ImportError without matplotlib."""
    from pangu_moe.report import plots
    plots.pyplot()
    found = [("loss.png", "Training loss and validation bits per byte",
              lambda path: plots.loss_figure(runs, path)),
             ("routing.png", "Dropped choices, inter-node fraction and capacity per logged step",
              lambda path: plots.routing_figure(runs, path))]
    for run in runs:
        if run_data.num_moe_layers(run.records) and len(run.records[0]["layers"][0]["tokens_per_expert"]) > 1:
            # one expert (the study's dense arm) has a constant load: no figure
            found.append((f"load_{run.name}.png", f"{run.name}: expert load per MoE layer over steps",
                          lambda path, run=run: plots.load_figure(run, path)))
        first = run_data.initial_ranks(run)
        if run_data.placement_series(run.records, first) is not None:
            found.append((f"placement_{run.name}.png", f"{run.name}: where each expert lived (expert placement)",
                          lambda path, run=run, first=first: plots.placement_figure(run, path, first)))
        if run.trace:
            found.append((f"trace_{run.name}.png", f"{run.name}: routing of generated text",
                          lambda path, run=run: plots.trace_figure(run.trace, run.name, path)))
    return found


def write(runs, out, log=print):
    """Write the report of `runs` ([runs.Run]) into folder `out`.

    Returns: {"rows": [summary_row dicts], "figures": [written PNG paths], "report": report.md path,
    "plots": bool (False without matplotlib)}.
    """
    os.makedirs(out, exist_ok=True)
    rows = [summary_row(run) for run in runs]
    written, captions = [], []
    try:
        planned = figures(runs)
        plotting = True
    except ImportError:
        planned, plotting = [], False
        log(PLOT_HINT)
    progress = Progress("report", "figures", log=log)
    for name, caption, draw in planned:
        path = os.path.join(out, name)
        draw(path)
        progress.update(len(written) + 1, len(planned))
        written.append(path)
        captions.append(f"![{caption}]({name})")
    partial = [row["run"] for row in rows if row["source"] != run_data.SUMMARY]
    lines = ["# Run report", "", markdown(rows), ""]
    if partial:
        lines += [f"Runs without summary.json ({', '.join(partial)}): counts over their logged steps, val bpb of their "
                  f"last periodic evaluation; '-' where only a finished run knows the value.", ""]
    lines += [f"Runs: {', '.join(f'{run.name} ({run.path})' for run in runs)}", ""]
    lines += captions if plotting else [PLOT_HINT]
    report = os.path.join(out, "report.md")
    with open(report, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as fh:
        json.dump({"rows": rows}, fh, indent=2)
    return {"rows": rows, "figures": written, "report": report, "plots": plotting}
