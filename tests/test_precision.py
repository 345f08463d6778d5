"""The precision policy: `auto` takes bf16 autocast on a CPU only where the CPU has bf16
instructions (software-emulated bf16 made the lspet_cpu network's training step 8x slower on an AVX2-only CPU)."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.inference import cpu_has_bf16_instructions, use_bf16

CPU = torch.device("cpu")
AVX2_EPYC = "fpu vme sse sse2 avx f16c avx2 sha_ni vaes vpclmulqdq"
SAPPHIRE_RAPIDS = "avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
SKYLAKE_AVX512 = "avx2 avx512f avx512dq avx512bw avx512vl"  # AVX-512 but bf16 emulated
ZEN4 = "avx2 avx512f avx512bw avx512vl avx512_bf16"


def cpuinfo(tmp_path, name: str, flags: str) -> str:
    path = tmp_path / name
    # Two processors, as Linux writes them; only the "flags" line matters.
    block = f"processor\t: 0\nmodel name\t: {name}\nflags\t\t: {flags}\nbugs\t\t: spectre_v1\n\n"
    path.write_text(block + block.replace("processor\t: 0", "processor\t: 1"))
    return str(path)


@pytest.mark.parametrize("name, flags, native", [("epyc-avx2", AVX2_EPYC, False), ("xeon-amx", SAPPHIRE_RAPIDS, True),
                                                 ("skylake", SKYLAKE_AVX512, False), ("zen4", ZEN4, True)])
def test_bf16_instructions_are_read_from_the_cpu_flags(tmp_path, name, flags, native):
    assert cpu_has_bf16_instructions(cpuinfo(tmp_path, name, flags)) is native


def test_flags_that_cannot_be_read_mean_fp32(tmp_path):
    assert cpu_has_bf16_instructions(str(tmp_path / "no-such-cpuinfo")) is False
    no_flags = tmp_path / "cpuinfo-without-flags"
    no_flags.write_text("processor\t: 0\nmodel name\t: some ARM core\nFeatures\t: fp asimd bf16\n")
    assert cpu_has_bf16_instructions(str(no_flags)) is False


def test_auto_follows_this_cpu_and_explicit_choices_are_kept():
    assert use_bf16("auto", CPU) is cpu_has_bf16_instructions()
    assert use_bf16("bf16", CPU) is True
    assert use_bf16("fp32", CPU) is False
