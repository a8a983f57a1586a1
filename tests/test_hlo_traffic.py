"""The HBM-traffic count over a compiled program's kernels (`fmcejax.tools.hlo_traffic`)."""

import jax
import jax.numpy as jnp
import pytest

from fmcejax.tools import hlo_traffic

# A TPU-style module: a parameter prefetched into VMEM (S(1)), half of another sliced into it, a
# fusion reading one HBM and one VMEM operand, a gather of 2 rows from a 1000-row parameter, a
# while loop of 3 trips around a fusion, an async all-reduce.
HLO = """HloModule m

%fused (p0: bf16[16,64], p1: f32[8]) -> bf16[16,64] {
  %p0 = bf16[16,64]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %r = bf16[16,64]{1,0:T(8,128)(2,1)} copy(%p0)
}

%body (s: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %s = (s32[], f32[4,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %x = f32[4,4]{1,0} get-tuple-element(%s), index=1
  %y = f32[4,4]{1,0} fusion(%x), kind=kLoop, calls=%fused2, metadata={op_name="jit(f)/body/mul"}
  ROOT %t = (s32[], f32[4,4]{1,0}) tuple(%i, %y)
}

%gathered (p0: f32[1000,4], p1: s32[2]) -> f32[2,4] {
  %p0 = f32[1000,4]{1,0} parameter(0)
  %p1 = s32[2]{0} parameter(1)
  ROOT %rows = f32[2,4]{1,0} gather(%p0, %p1), offset_dims={1}, slice_sizes={1,4}
}

%cond (s: (s32[], f32[4,4])) -> pred[] {
  %s = (s32[], f32[4,4]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: bf16[16,64], b: f32[8], w: (s32[], f32[4,4]), d: f32[1000,4], i: s32[2]) -> bf16[16,64] {
  %a = bf16[16,64]{1,0:T(8,128)(2,1)} parameter(0)
  %b = f32[8]{0:T(128)} parameter(1)
  %w = (s32[], f32[4,4]{1,0}) parameter(2)
  %d = f32[1000,4]{1,0} parameter(3)
  %i = s32[2]{0} parameter(4)
  %g = f32[2,4]{1,0} fusion(%d, %i), kind=kLoop, calls=%gathered
  %cs = (f32[8]{0:T(128)S(1)}, f32[8]{0:T(128)}, u32[]{:S(2)}) copy-start(%b)
  %cd = f32[8]{0:T(128)S(1)} copy-done(%cs)
  %ss = ((bf16[16,64]{1,0:T(8,128)(2,1)}), bf16[8,64]{1,0:T(8,128)(2,1)S(1)}, s32[]{:S(2)}) slice-start(%a), slice={[0:8], [0:64]}
  %sd = bf16[8,64]{1,0:T(8,128)(2,1)S(1)} slice-done(%ss)
  %f = bf16[16,64]{1,0:T(8,128)(2,1)} fusion(%a, %cd), kind=kOutput, calls=%fused, metadata={op_name="jit(f)/net/conv"}
  %loop = (s32[], f32[4,4]{1,0}) while(%w), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %x0 = f32[4,4]{1,0} get-tuple-element(%loop), index=1
  %ars = f32[4,4]{1,0} all-reduce-start(%x0), to_apply=%add
  %ard = f32[4,4]{1,0} all-reduce-done(%ars)
  ROOT %out = bf16[16,64]{1,0:T(8,128)(2,1)} copy(%f)
}
"""


def test_array_bytes_pads_tpu_tiles_and_skips_on_chip_memory():
  assert hlo_traffic.array_bytes("f32", "4,4", "1,0") == 64
  # minor dim 64 -> 128 lanes, second-minor 16 is already a multiple of 8
  assert hlo_traffic.array_bytes("bf16", "16,64", "1,0:T(8,128)(2,1)") == 16 * 128 * 2
  # the layout's minor-to-major order decides which dimension is padded to 128
  assert hlo_traffic.array_bytes("bf16", "128,3", "0,1:T(8,128)(2,1)") == 8 * 128 * 2
  assert hlo_traffic.array_bytes("f32", "8", "0:T(128)S(1)") == 0
  assert hlo_traffic.shape_bytes("(f32[2]{0}, u8[100]{0})", skip_scratch=True) == 8


def test_kernels_count_loops_per_trip_async_pairs_once_and_gathers_by_rows():
  ks = hlo_traffic.kernels(HLO)
  by_name = {k.name: k for k in ks}
  assert set(by_name) == {"cs", "cd", "ss", "sd", "g", "f", "y", "ars", "ard", "out"}
  tile = 16 * 128 * 2  # bf16[16,64] padded to 128 lanes
  assert by_name["cs"].bytes == 128 * 4  # reads b from HBM (padded to 128); writes VMEM
  assert by_name["cd"].bytes == 0  # lands in VMEM
  assert by_name["ss"].bytes == tile / 2 and by_name["sd"].bytes == 0  # reads its half only
  assert by_name["f"].bytes == 2 * tile  # reads a, writes f; the VMEM operand is free
  assert by_name["f"].opcode == "kOutput" and by_name["f"].op_name == "jit(f)/net/conv"
  assert by_name["y"].bytes == 64 + 64  # per trip: a 4x4 f32 read and written
  assert by_name["g"].bytes == 32 + 8 + 32  # the 2 rows gathered (not the 1000), indices, result
  assert by_name["ars"].bytes == 64 and by_name["ard"].bytes == 64
  assert [k for k in by_name if by_name[k].in_loop] == ["y"]
  rest = sum(k.bytes for k in by_name.values()) - by_name["y"].bytes
  assert hlo_traffic.per_iteration(ks) == by_name["y"].bytes + rest
  # run twice per call, the loop's kernels count per iteration, the rest half
  assert hlo_traffic.per_iteration(ks, iterations=2) == by_name["y"].bytes + rest / 2
  assert hlo_traffic.heaviest(ks, 1)[0].name in {"f", "out"}


def test_a_cpu_program_moves_what_its_kernels_read_and_write():
  x = jnp.zeros((1000,), jnp.float32)
  hlo = jax.jit(lambda x: x * 2.0 + 1.0).lower(x).compile().as_text()
  # one fused loop: 4 kB in, 4 kB out
  assert hlo_traffic.per_iteration(hlo_traffic.kernels(hlo)) == pytest.approx(8000)
