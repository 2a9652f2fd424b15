"""The routing trace of generated text (`pangu-moe generate --trace`): its file format and its
terminal rendering. The report draws the same trace as a picture (`report.plots.trace_figure`).

trace.json:
    {"router": str, "top_k": K, "num_experts": E, "num_groups": G (level-1 groups; absent in older traces: 1),
     "expert_node": [E] ints, "domain": str,
     "prompt_bytes": P (prompt tokens), "bytes": [n] ints (token ids, prompt then generated),
     "token_bytes": [n] lists of ints (the UTF-8 bytes of each token; absent in older traces: one byte each),
     "expert_index": [L][n][K] ints (global expert ids), "keep": [L][n][K] bools, "sampling": {...}}

Both renderings draw the text one cell per character (`characters`), each in the colour of the token holding
its first byte: a character spread over several byte tokens is drawn once, and a BPE token of several
characters colours each of them.
"""
import unicodedata

from pangu_moe.report.palette import expert_colours, expert_groups

WIDTH = 64  # characters per rendered line
SPECIAL = {"\n": "\u21b5", "\t": "\u2192", "\r": "\u2190"}
INVALID = "\ufffd"  # a byte that does not start a valid UTF-8 character


def characters(trace):
    """The trace's text as cells: [(glyph str, index of the token holding the character's first byte)].

    Newline, tab and CR are drawn as arrows, other control characters as a dot, an invalid byte as U+FFFD.
    """
    pieces = trace.get("token_bytes") or [[b] for b in trace["bytes"]]
    stream = bytes(b for piece in pieces for b in piece)
    owner = [i for i, piece in enumerate(pieces) for _ in piece]
    cells, pos = [], 0
    while pos < len(stream):
        lead = stream[pos]
        length = 1 if lead < 0x80 else 2 if 0xc0 <= lead < 0xe0 else 3 if 0xe0 <= lead < 0xf0 else \
            4 if 0xf0 <= lead < 0xf8 else 1
        try:
            char = stream[pos:pos + length].decode("utf-8")
        except UnicodeDecodeError:
            char, length = INVALID, 1
        if char in SPECIAL:
            glyph = SPECIAL[char]
        elif unicodedata.category(char) == "Cc":
            glyph = "\u2022"
        else:
            glyph = char
        cells.append((glyph, owner[pos]))
        pos += length
    return cells


def columns(glyph):
    """Terminal columns a glyph takes: 2 for East Asian wide and full-width characters (CJK, most emoji)."""
    return 2 if unicodedata.east_asian_width(glyph) in ("W", "F") else 1


def _base36(value):
    return "0123456789abcdefghijklmnopqrstuvwxyz"[value] if value < 36 else "+"


def _background(rgb):
    r, g, b = (int(round(255 * c)) for c in rgb)
    return f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m"


RESET = "\x1b[0m"


def render(trace, colour=True, width=WIDTH):
    """The trace as terminal text.

    Per chunk of `width` characters (`characters`): with `colour`, one line per MoE layer showing the characters
    on the background colour of their token's first-choice expert (`palette.expert_colours`), underlined where
    that choice was dropped; without colour, the characters on one line and each layer's first-choice expert ids
    (base 36, `x` where dropped) below them, padded under wide characters. A `|` marks where the prompt ends.
    Ends with a legend.

    Args:
        trace: a trace dict (module docstring). Returns: str.
    """
    layers, keep = trace["expert_index"], trace["keep"]
    colours = expert_colours(len(trace["expert_node"]))
    prompt = trace["prompt_bytes"]
    cells = characters(trace)
    lines = []
    for start in range(0, len(cells), width):
        chunk = cells[start:start + width]
        marks = ["|" if start + j and cells[start + j - 1][1] < prompt <= token else ""  # the prompt's end
                 for j, (_, token) in enumerate(chunk)]
        if not colour:
            lines.append("      " + "".join(mark + glyph for mark, (glyph, _) in zip(marks, chunk)))
        for layer, (index, kept) in enumerate(zip(layers, keep)):
            drawn = []
            for mark, (glyph, token) in zip(marks, chunk):
                expert = index[token][0]
                if colour:
                    underline = "" if kept[token][0] else "\x1b[4m"
                    drawn.append(mark + _background(colours[expert]) + underline + glyph + RESET)
                else:
                    drawn.append(mark + (_base36(expert) if kept[token][0] else "x").ljust(columns(glyph)))
            lines.append(f"L{layer:<4d} " + "".join(drawn))
        lines.append("")
    legend = []
    for expert, label in enumerate(expert_labels(trace)):
        legend.append(_background(colours[expert]) + f" {label} " + RESET if colour else label)
    groups = " and level-1 groups (g)" if trace.get("num_groups", 1) > 1 else ""
    lines.append(f"experts (e), their nodes (n){groups}: " + (" ".join(legend)))
    return "\n".join(lines)


def expert_labels(trace):
    """'e3 n1' per expert, with ' g0' (its level-1 group) when the run has several groups."""
    nodes, groups = trace["expert_node"], trace.get("num_groups", 1)
    group_of = expert_groups(len(nodes), groups)
    return [f"e{e} n{n}" + (f" g{group_of[e]}" if groups > 1 else "") for e, n in enumerate(nodes)]
