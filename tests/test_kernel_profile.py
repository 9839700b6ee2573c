"""The kernel profile summary (`msff_jax.analysis.benchmark.kernel_profile`).

Checked on hand-written traces shaped like the profiler's GPU export (a device process
with stream lines and derived lines that cover the same time) and on a real CPU trace.
"""

import gzip
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from msff_jax.analysis.benchmark import kernel_profile

REPO = Path(__file__).resolve().parents[1]


def _write_trace(path: Path, events: list) -> Path:
    with gzip.open(path, "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)
    return path


def _gpu_like_trace():
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
    ]
    kernels = [  # Two steps of three kernels, durations in microseconds.
        ("sm90_xmma_fprop_implicit_gemm_bf16", 300.0),
        ("select_and_scatter_3", 200.0),
        ("loop_multiply_fusion_2", 100.0),
    ] * 2
    stream = [
        {"ph": "X", "pid": 1, "tid": 7, "ts": i, "dur": dur, "name": name}
        for i, (name, dur) in enumerate(kernels)
    ]
    derived = [{"ph": "X", "pid": 1, "tid": 8, "ts": 0, "dur": 1200.0, "name": "fusion.1"}]
    host = [{"ph": "X", "pid": 2, "tid": 1, "ts": 0, "dur": 5000.0, "name": "PjitFunction(step)"}]
    return meta + stream + derived + host


def test_summary_counts_stream_kernels_once_per_step_by_kind(tmp_path):
    path = _write_trace(tmp_path / "perfetto_trace.json.gz", _gpu_like_trace())
    summary = kernel_profile.summarise_trace(path, steps=2)
    assert summary["source"] == "device"
    # The derived "XLA Ops" line and the host are left out: 600 us of kernels per step.
    assert summary["kernel_ms_per_step"] == pytest.approx(0.6)
    assert summary["launches_per_step"] == 3 and summary["distinct_kernels"] == 3
    kinds = {k["kind"]: k["ms_per_step"] for k in summary["kinds"]}
    assert kinds == pytest.approx(
        {
            "conv forward": 0.3,
            "pooling": 0.2,
            "elementwise": 0.1,
        }
    )
    assert [k["name"] for k in summary["top_kernels"]][0] == "sm90_xmma_fprop_implicit_gemm_bf16"
    assert summary["top_kernels"][0]["share"] == pytest.approx(0.5)
    table = kernel_profile.markdown(summary, "toy: train step")
    assert "| pooling | 0.200 | 33.3% |" in table


@pytest.mark.parametrize(
    "name, kind",
    [
        # cuDNN on Hopper and Ampere (XLA's and PyTorch's convolutions alike).
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64",
         "conv forward"),
        ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw", "conv input-gradient"),
        ("sm80_xmma_wgrad_implicit_gemm_indexed_bf16", "conv weight-gradient"),
        ("void cudnn::cnn::wgrad2d_grouped_direct_kernel<bf16>", "conv weight-gradient"),
        ("void cudnn::cnn::conv2d_grouped_direct_kernel<bf16>", "conv forward"),
        ("cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16>",
         "conv forward"),
        ("void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16>", "copy / transpose"),
        ("convolution.12", "conv forward"),
        # PyTorch's own kernels and the CPU's one-op backward.
        ("conv_depthwise2d_grad_weight_kernel", "conv weight-gradient"),
        ("aten::convolution_backward", "conv gradients (one op)"),
        ("max_pool_forward_nhwc", "pooling"),
        ("void at::native::batch_norm_collect_statistics_channels_last_kernel", "reduction"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::add>", "elementwise"),
        # Inductor: the prefix decides, whatever aten ops the name lists after it.
        ("triton_poi_fused_convolution_relu_0", "elementwise"),
        ("triton_red_fused_convolution_backward_native_batch_norm_backward_12", "reduction"),
        ("triton_per_fused__native_batch_norm_legit_functional_3", "reduction"),
        ("triton_poi_fused_clone_4", "copy / transpose"),
        # A dtype cast is elementwise, as XLA's convert fusions are.
        ("triton_poi_fused__to_copy_2", "elementwise"),
        ("triton_for_fused_0", "elementwise"),
        ("triton_poi_fused_max_pool2d_with_indices_backward_5", "pooling"),
        ("triton_tem_fused_convolution_0", "conv forward"),
        ("triton_tem_fused_addmm_1", "matmul"),
        # XLA's fusions and library calls.
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", "matmul"),
        ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT", "matmul"),
        ("gemm_fusion_dot_123", "matmul"),
        ("loop_convert_fusion_3", "elementwise"),
        ("wrapped_convert", "elementwise"),
        ("input_convert_reduce_fusion_1", "reduction"),
        ("concatenate_convert_fusion", "elementwise"),
        ("transpose_fusion_2", "copy / transpose"),
        ("select_and_scatter_7", "pooling"),
        ("all-reduce.3", "collective"),
        ("cudaMemsetAsync", "memset"),
        ("wrapped_multiply", "elementwise"),
        ("wrapped_dot", "matmul"),
        ("void splitKreduce_kernel<32, 16, int, float>", "matmul"),
        # Names with "grad_input" that are no convolution.
        ("void at::native::adaptive_average_gradinput_nhwc<float>", "pooling"),
        ("void at::native::layer_norm_grad_input_kernel<float>", "reduction"),
        ("void at::native::adaptive_average_pool_nhwc<c10::BFloat16>", "pooling"),
        ("void cudnn::bn_fw_tr_1C11_kernel_NCHW<float, float, 512, true, 1>", "reduction"),
        ("void at::native::cunn_SoftMaxForward<4, float>", "reduction"),
        # Older cuDNN convolutions, one with a fused ReLU in its name; cuDNN's helpers.
        ("ampere_scudnn_128x64_relu_small_nn_v1", "conv forward"),
        ("ampere_fp16_s16816cudnn_fp16_128x128_ldg8_relu_f2f_exp_small_nhwc2nchw_tn_v1",
         "conv forward"),
        ("void cask__5x_cudnn::computeOffsetsKernel<false, false>", "conv forward"),
        ("void cudnn::ops::nhwcAddPaddingKernel<float>", "copy / transpose"),
        ("some_unknown_kernel", "other"),
    ],
)
def test_kernel_kinds_read_off_names(name, kind):
    assert kernel_profile.kernel_kind(name) == kind


def test_kind_order_lists_each_kind_once():
    order = kernel_profile.KIND_ORDER
    assert len(order) == len(set(order)) and order[-1] == "other"
    assert set(order) == {kind for kind, _ in kernel_profile.KERNEL_KINDS} | {"other"}


def test_several_devices_give_per_device_figures_and_a_missing_gpu_trace_warns(tmp_path):
    events = _gpu_like_trace()
    # A second device running the same kernels.
    events += [
        {"ph": "M", "name": "process_name", "pid": 3, "args": {"name": "/device:GPU:1"}},
        {"ph": "M", "name": "thread_name", "pid": 3, "tid": 7, "args": {"name": "Stream #7"}},
    ] + [dict(e, pid=3) for e in events if e.get("pid") == 1 and e.get("tid") == 7 and e["ph"] == "X"]
    two = kernel_profile.summarise_trace(_write_trace(tmp_path / "two.json.gz", events), steps=2)
    assert two["device_count"] == 2 and two["kernel_ms_per_step"] == pytest.approx(0.6)
    assert two["launches_per_step"] == 3 and two["warning"] is None

    host_only = [e for e in _gpu_like_trace() if e.get("pid") == 2]
    summary = kernel_profile.summarise_trace(
        _write_trace(tmp_path / "host.json.gz", host_only), steps=1, expect_device=True
    )
    assert summary["source"] == "host" and "no device events" in summary["warning"]
    assert "**Warning: no device events" in kernel_profile.markdown(summary, "t")


def test_unreadable_trace_is_named(tmp_path):
    bad = tmp_path / "perfetto_trace.json.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="perfetto_trace.json.gz: not a readable Perfetto JSON trace"):
        kernel_profile.summarise_trace(bad, steps=1)


def test_a_real_cpu_trace_is_summarised_from_host_events(tmp_path):
    step = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((64, 64))
    step(x).block_until_ready()
    trace = kernel_profile.trace_steps(lambda n: [step(x) for _ in range(n)], 2, tmp_path)
    summary = kernel_profile.summarise_trace(trace, steps=2)
    assert summary["source"] == "host"
    assert summary["kernel_ms_per_step"] > 0 and summary["top_kernels"]
    assert not any(k["name"].startswith("$") for k in summary["top_kernels"])  # No Python frames.
