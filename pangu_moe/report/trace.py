"""The routing trace of generated text (`pangu-moe generate --trace`): its file format and its
terminal rendering. The report draws the same trace as a picture (`report.plots.trace_figure`).

trace.json:
    {"router": str, "top_k": K, "num_experts": E, "expert_node": [E] ints, "domain": str,
     "prompt_bytes": P, "bytes": [n] ints (prompt then generated),
     "expert_index": [L][n][K] ints (global expert ids), "keep": [L][n][K] bools, "sampling": {...}}
"""
from pangu_moe.report.palette import expert_colours

WIDTH = 64  # bytes per rendered line
SPECIAL = {0x0a: "\u21b5", 0x09: "\u2192", 0x0d: "\u2190"}


def byte_glyph(value):
    """One printable character standing for a byte: ASCII as itself, newline/tab/CR as arrows, the rest a dot."""
    if value in SPECIAL:
        return SPECIAL[value]
    return chr(value) if 0x20 <= value < 0x7f else "\u2022"


def _base36(value):
    return "0123456789abcdefghijklmnopqrstuvwxyz"[value] if value < 36 else "+"


def _background(rgb):
    r, g, b = (int(round(255 * c)) for c in rgb)
    return f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m"


RESET = "\x1b[0m"


def render(trace, colour=True, width=WIDTH):
    """The trace as terminal text.

    Per chunk of `width` bytes: with `colour`, one line per MoE layer showing the bytes on the background
    colour of their first-choice expert (`palette.expert_colours`: one hue per node), underlined where that
    choice was dropped; without colour, the bytes on one line and each layer's first-choice expert ids
    (base 36, `x` where dropped) below them. A `|` marks where the prompt ends. Ends with a legend.

    Args:
        trace: a trace dict (module docstring). Returns: str.
    """
    data, layers, keep = trace["bytes"], trace["expert_index"], trace["keep"]
    colours = expert_colours(trace["expert_node"])
    prompt = trace["prompt_bytes"]
    lines = []
    for start in range(0, len(data), width):
        span = range(start, min(start + width, len(data)))
        glyphs = [("|" if i == prompt and i else "") + byte_glyph(data[i]) for i in span]
        if not colour:
            lines.append("      " + "".join(glyphs))
        for layer, (index, kept) in enumerate(zip(layers, keep)):
            cells = []
            for i, glyph in zip(span, glyphs):
                expert = index[i][0]
                if colour:
                    underline = "" if kept[i][0] else "\x1b[4m"
                    cells.append(glyph[:-1] + _background(colours[expert]) + underline + glyph[-1] + RESET)
                else:
                    cells.append(glyph[:-1] + (_base36(expert) if kept[i][0] else "x"))
            lines.append(f"L{layer:<4d} " + "".join(cells))
        lines.append("")
    legend = []
    for expert, node in enumerate(trace["expert_node"]):
        label = f" e{expert} n{node} "
        legend.append(_background(colours[expert]) + label + RESET if colour else label.strip())
    lines.append("experts (e) and their nodes (n): " + (" ".join(legend)))
    return "\n".join(lines)
