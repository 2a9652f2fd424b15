"""Expert colours shared by the terminal trace and the report's pictures: one hue per expert, spread around the
colour wheel, neighbours also told apart by lightness; nodes and level-1 groups are labelled, not coloured."""
import colorsys


def expert_colours(num_experts):
    """RGB in [0, 1] per expert: E (r, g, b) float tuples, expert e at hue e / E, lightness alternating between
    0.5 and 0.7 so that adjacent hues of many experts still differ."""
    return [colorsys.hls_to_rgb(e / num_experts, 0.5 if e % 2 == 0 else 0.7, 0.75) for e in range(num_experts)]


def expert_groups(num_experts, num_groups):
    """The level-1 group of each expert: [E] ints, the E / G experts of group g contiguous."""
    return [e // (num_experts // num_groups) for e in range(num_experts)]
