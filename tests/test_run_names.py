"""Run names never drift silently (issue 17): names computed with greedymm before the registries (commit d90399c, its
flat TrainConfig fields) must come out of today's configs unchanged, so that every old checkpoint still resumes.

Two methods changed their behaviour since (issue 16): Gradient Blending's weights sum to 2 (vanilla's gradient
scale) and RUBi's bias classifier reads the bias modality alone. Their default runs therefore have new names, and
the settings that reproduce 0.1's behaviour (`gblend_scale=1`, `rubi_bias_input="fused"`) give the old ones."""
from __future__ import annotations

import pytest

from greedymm.config import DataConfig, TrainConfig, run_name

# dataset/algorithm/variant -> the name d90399c gave (DataConfig.for_dataset, TrainConfig.for_dataset; seed 0 for the
# default settings, seed 1 with the options below).
PINNED = {
    "embedded/vanilla/default": "embedded_vanilla_s0_13cf23c9",
    "embedded/vanilla/options": "embedded_vanilla_s1_13cf23c9",
    "embedded/guided/default": "embedded_guided_s0_166da4f9",
    "embedded/guided/options": "embedded_guided_s1_358c3bad",
    "embedded/ogm_ge/default": "embedded_ogm_ge_s0_ecdbd831",
    "embedded/ogm_ge/options": "embedded_ogm_ge_s1_39a1892f",
    "embedded/gblend/default": "embedded_gblend_s0_5e746984",
    "embedded/gblend/options": "embedded_gblend_s1_a0ea1d84",
    "embedded/rubi/default": "embedded_rubi_s0_39fcb626",
    "embedded/rubi/options": "embedded_rubi_s1_b0bb2449",
    "embedded/unimodal_m0/default": "embedded_unimodal_m0_s0_13cf23c9",
    "embedded/unimodal_m0/options": "embedded_unimodal_m0_s1_13cf23c9",
    "embedded/random/default": "embedded_random_s0_0eea8b67",
    "embedded/random/options": "embedded_random_s1_f007b752",
    "colored_digits/vanilla/default": "colored_digits_vanilla_s0_f506a76c",
    "colored_digits/vanilla/options": "colored_digits_vanilla_s1_f506a76c",
    "colored_digits/guided/default": "colored_digits_guided_s0_03a52db4",
    "colored_digits/guided/options": "colored_digits_guided_s1_bb1af4ad",
    "colored_digits/ogm_ge/default": "colored_digits_ogm_ge_s0_17dc9e79",
    "colored_digits/ogm_ge/options": "colored_digits_ogm_ge_s1_2e431b86",
    "colored_digits/gblend/default": "colored_digits_gblend_s0_6b107b28",
    "colored_digits/gblend/options": "colored_digits_gblend_s1_4254175e",
    "colored_digits/rubi/default": "colored_digits_rubi_s0_b06fa7c5",
    "colored_digits/rubi/options": "colored_digits_rubi_s1_5222ca08",
    "colored_digits/unimodal_m0/default": "colored_digits_unimodal_m0_s0_f506a76c",
    "colored_digits/unimodal_m0/options": "colored_digits_unimodal_m0_s1_f506a76c",
    "colored_digits/random/default": "colored_digits_random_s0_82ee6812",
    "colored_digits/random/options": "colored_digits_random_s1_6caccdca",
    "modelnet40/guided/default": "modelnet40_guided_s0_c45234ea",
    "modelnet40/guided/options": "modelnet40_guided_s1_dbcc9d37",
    "colored_mnist/guided/default": "colored_mnist_guided_s0_d9df9166",
    "colored_mnist/guided/options": "colored_mnist_guided_s1_b577cc50",
}
# The non-default settings of the "options" variants; unimodal_m0's is another method's (it must not rename it).
OPTIONS = {"vanilla": {}, "guided": dict(epsilon=0.2, window=3, warmup_epochs=2),
           "ogm_ge": dict(ogm_alpha=0.5, ogm_end_epoch=4), "gblend": dict(gblend_period=2),
           "rubi": dict(rubi_bias="m1"), "unimodal_m0": dict(epsilon=0.3), "random": dict(warmup_epochs=3)}


# The settings that reproduce greedymm 0.1's behaviour of the methods that changed since.
LEGACY = {"gblend": {"gblend_scale": 1.0}, "rubi": {"rubi_bias_input": "fused"}}


@pytest.mark.parametrize("key", list(PINNED))
def test_run_names_are_those_of_the_flat_settings(key):
    dataset, algorithm, variant = key.split("/")
    options, seed = (OPTIONS[algorithm], 1) if variant == "options" else ({}, 0)
    legacy_protocol = {"full_acc_steps": None}  # 0.1 counted the stop rule in epochs on every dataset
    cfg = TrainConfig.for_dataset(dataset, algorithm=algorithm, seed=seed, **legacy_protocol,
                                  options={**options, **LEGACY.get(algorithm, {})})
    assert run_name(DataConfig.for_dataset(dataset), cfg) == PINNED[key]
    if algorithm in LEGACY:  # the new behaviour is a new run, never a resumed old one
        new = TrainConfig.for_dataset(dataset, algorithm=algorithm, seed=seed, **legacy_protocol, options=options)
        assert run_name(DataConfig.for_dataset(dataset), new) != PINNED[key]


def test_the_digit_presets_count_the_stop_rule_in_mnist_steps():
    """SPEC Sec. 10: 5 epochs of MNIST's 391 steps, on both digit datasets; the stand-in trains 150 epochs."""
    for dataset in ("colored_mnist", "colored_digits"):
        cfg = TrainConfig.for_dataset(dataset)
        assert cfg.full_acc_steps == 5 * 391 and cfg.identity()["full_acc_steps"] == 1955
    assert TrainConfig.for_dataset("colored_digits").max_epochs == 150
    assert TrainConfig.for_dataset("colored_mnist").max_epochs == 300
    assert TrainConfig.for_dataset("modelnet40").full_acc_steps is None  # the paper's epochs


def test_a_stop_rule_in_steps_is_a_new_run_and_its_absence_is_not():
    data = DataConfig.for_dataset("colored_mnist")
    default = TrainConfig.for_dataset("colored_mnist", algorithm="guided", full_acc_steps=None)
    assert "full_acc_steps" not in default.identity()
    assert run_name(data, TrainConfig.for_dataset("colored_mnist", algorithm="guided", full_acc_steps=100)) != \
        run_name(data, default)


def test_a_custom_models_run_name_is_pinned_too():
    cfg = TrainConfig.smoke(lr=0.2, l1=1e-4, algorithm="guided", seed=2)
    assert run_name(DataConfig.smoke(image_size=16), cfg, "greedymm.model:mmtm_convnet") == \
        "embedded_guided_s2_171a8798"


def test_the_identity_is_the_flat_dict_of_before():
    """TrainConfig.identity() as d90399c computed it: the shared fields and the method's own settings, flat."""
    guided = TrainConfig.for_dataset("colored_digits", algorithm="guided", full_acc_steps=None).identity()
    assert guided == {"algorithm": "guided", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "l1": 0.0,
                      "plateau_factor": 0.3, "plateau_patience": 10, "plateau_threshold": 1e-3, "min_lr": 1e-6,
                      "full_acc_epochs": 5, "warmup_epochs": 1, "epsilon": 0.1, "window": 5, "seed": 0,
                      "precision": "auto", "channels_last": True}
    ogm = TrainConfig(algorithm="ogm_ge", options={"epsilon": 0.5}).identity()
    assert {k: ogm[k] for k in ("ogm_alpha", "ogm_start_epoch", "ogm_end_epoch")} == {
        "ogm_alpha": 0.1, "ogm_start_epoch": 0, "ogm_end_epoch": None} and "epsilon" not in ogm
