"""What the exchange moves and what it would cost: exact token/byte accounting (`traffic`) and the cluster
cost model (`cost`). Pure host-side numpy; the mechanism that moves the tokens is `pangu_moe/dispatch/`."""
