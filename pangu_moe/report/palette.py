"""Expert colours shared by the terminal trace and the report's pictures: one hue per node, one
shade per expert of that node, so the eye reads the node first and the expert second."""
import colorsys

# HLS hues of blue, orange, green, red, purple, olive, pink, cyan: far apart, so nodes never blend.
NODE_HUES = (0.58, 0.08, 0.33, 0.0, 0.76, 0.15, 0.88, 0.5)


def expert_colours(expert_node):
    """RGB in [0, 1] per expert.

    Args:
        expert_node: sequence of ints [E], the node hosting each expert (`Topology.expert_node`).
    Returns:
        list of E (r, g, b) float tuples; experts of node n share hue NODE_HUES[n % 8], lighter to darker
        in expert order.
    """
    colours = []
    for e, node in enumerate(expert_node):
        mates = [i for i, n in enumerate(expert_node) if n == node]
        share = mates.index(e) / max(1, len(mates) - 1)
        colours.append(colorsys.hls_to_rgb(NODE_HUES[node % len(NODE_HUES)], 0.72 - 0.4 * share, 0.65))
    return colours
