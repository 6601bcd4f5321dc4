"""benchmarks/pet_profile.py (issue 19): its attribution rules and its CPU smoke path."""

import json

import pytest
import torch
from conftest import import_benchmark

PP = import_benchmark("pet_profile")


@pytest.mark.parametrize("name, cat", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "gemm"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("triton_poi_fused_add_mul_sigmoid_0", "triton fused"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "aten element-wise"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<1>, "
     "LpNormFunctor<c10::BFloat16, NormType::L2, float, float>, float*, int>", "gradient norm"),
    ("triton_poi_fused__scaled_dot_product_efficient_attention_backward_0", "triton fused"),
    ("Memcpy DtoD (Device -> Device)", "copy / memset"),
])
def test_kernel_categories(name, cat):
    assert PP.kernel_category(name) == cat


def test_gemm_split_by_pet_width():
    pet, frozen = {96}, {768, 3072, 50265}
    assert PP.classify_gemm([[28000, 768], [768, 96]], pet, frozen) == "gemm: PET projections"
    assert PP.classify_gemm([[96, 28000], [28000, 768]], pet, frozen) == "gemm: PET projections"
    assert PP.classify_gemm([[28000, 768], [768, 3072]], pet, frozen) == "gemm: backbone"
    # a width the backbone also has cannot tell them apart: counted as the backbone's
    assert PP.classify_gemm([[28000, 768], [768, 768]], {768}, frozen) == "gemm: backbone"


def test_saved_inventory_counts_distinct_storages_without_parameters():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    inv = PP.SavedInventory({p.untyped_storage().data_ptr() for p in lin.parameters()})
    with inv.hooks():
        h = torch.sigmoid(lin(x))  # linear saves x (and its weight: excluded); sigmoid saves its output
        y = (h * h).sum()  # mul saves h twice: one storage, counted once
    y.backward()
    rows = {r["shape dtype"]: r["count"] for r in inv.table()}
    assert rows == {"[3, 8] float32": 1, "[3, 4] float32": 1}
    assert inv.total_bytes() == (3 * 8 + 3 * 4) * 4


def test_tiny_cpu_run(tmp_path):
    rc = PP.main(["--backbones", "bart-base", "--methods", "floor,vl-pet-large", "--device", "cpu", "--tiny",
                  "--steps", "1", "--warmup", "1", "--profile-steps", "1", "--out", str(tmp_path),
                  "--results-dir", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("pet_profile-*.json")
    data = json.loads(path.read_text())
    assert not data["errors"]
    floor, large = data["results"]["bart-base"]["floor"], data["results"]["bart-base"]["vl-pet-large"]
    assert floor["pet_widths"] == [] and large["pet_widths"]  # the tiny preset's r and r_g
    # the gated sub-layers keep more for the backward than the floor does
    assert large["memory"]["saved_for_backward_gib"] > floor["memory"]["saved_for_backward_gib"]
    assert large["memory"]["trainable_weights_gib"] > floor["memory"]["trainable_weights_gib"]


def test_memory_budget_needs_compile():
    with pytest.raises(SystemExit):
        PP.main(["--memory-budget", "0.5", "--device", "cpu", "--tiny"])
