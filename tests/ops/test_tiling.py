"""The tiling and core-split logic shared with the Ascend kernels (kernels/common/moe_kernel_common.h),
exercised on CPU through the built library."""
import ctypes

import numpy as np
import pytest

from pangu_moe.ops.build import library_path

UB_BYTES = 192 * 1024  # Ascend 910B unified buffer per AI Core
BUFFERS = 4  # double-buffered input and output queues


@pytest.fixture(scope="module")
def lib():
    return ctypes.CDLL(library_path())


def plan(lib, rows, row_elems, elem_bytes=4, ub_bytes=UB_BYTES, buffers=BUFFERS):
    out = (ctypes.c_int64 * 5)()
    status = lib.PanguMoePlanRowTiles(ctypes.c_int64(rows), ctypes.c_int64(row_elems), ctypes.c_int64(elem_bytes),
                                      ctypes.c_int64(ub_bytes), ctypes.c_int64(buffers), out)
    return status, list(out)


def test_exact_plan_for_hidden_1024(lib):
    # a 4 KiB row; a tile may use 192 KiB / 4 = 48 KiB: 12 rows, 4096 / 12 -> 342 tiles
    assert plan(lib, 4096, 1024) == (0, [12, 1024, 342, 1, 12 * 4096])


@pytest.mark.parametrize("tokens", [4096, 16384])
@pytest.mark.parametrize("hidden", [128, 1024, 5120, 40960])  # demo, bench, PanGu-Sigma, one row > a tile
@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_preset_tiles_fit_the_unified_buffer_and_cover_every_element(lib, tokens, hidden, elem_bytes):
    status, (rows_per_tile, cols_per_tile, row_tiles, col_tiles, tile_bytes) = plan(lib, tokens, hidden, elem_bytes)
    assert status == 0
    assert tile_bytes % 32 == 0 and BUFFERS * tile_bytes <= UB_BYTES
    assert rows_per_tile * cols_per_tile * elem_bytes <= tile_bytes
    assert (row_tiles - 1) * rows_per_tile < tokens <= row_tiles * rows_per_tile
    assert (col_tiles - 1) * cols_per_tile < hidden <= col_tiles * cols_per_tile
    assert (cols_per_tile * elem_bytes) % 32 == 0 or col_tiles == 1  # column blocks stay 32-byte aligned


def test_plan_rejects_a_buffer_too_small(lib):
    assert plan(lib, 8, 8, ub_bytes=64)[0] != 0


@pytest.mark.parametrize("items,cores", [(4096, 40), (7, 8), (16384, 48), (0, 4)])
def test_split_over_cores_covers_each_item_once(lib, items, cores):
    out = (ctypes.c_int64 * 2)()
    ranges = []
    for core in range(cores):
        lib.PanguMoeSplitOverCores(ctypes.c_int64(items), ctypes.c_int64(cores), ctypes.c_int64(core), out)
        ranges.append((out[0], out[1]))
    covered = np.concatenate([np.arange(b, e) for b, e in ranges])
    np.testing.assert_array_equal(covered, np.arange(items))
    sizes = [e - b for b, e in ranges]
    assert max(sizes) - min(sizes) <= 1
