"""The paper's model sets (appendix L, Tables 3 and 4) as timm names, for `convert --model_set=…`.

Each name is `architecture.pretrained_tag` as timm 1.0.31 publishes it. Paper rows timm lacks are
listed in MISSING_FROM_TIMM with the reason (BUILD_NOTES.md).
"""

PAPER_5X5 = [
    # MobileNetV3 (3x3 and 5x5 kernels)
    "mobilenetv3_large_100.miil_in21k_ft_in1k", "mobilenetv3_large_100.miil_in21k",
    "mobilenetv3_large_100.ra_in1k", "mobilenetv3_rw.rmsp_in1k",
    # EfficientNet (timm training)
    "efficientnet_b0.ra_in1k", "efficientnet_b1.ft_in1k", "efficientnet_b2.ra_in1k",
    "efficientnet_b3.ra2_in1k", "efficientnet_b4.ra2_in1k",
    "efficientnet_el.ra_in1k", "efficientnet_el_pruned.in1k", "efficientnet_em.ra2_in1k",
    "efficientnet_es.ra_in1k", "efficientnet_es_pruned.in1k", "efficientnet_lite0.ra_in1k",
    # EfficientNet (TensorFlow ports)
    "tf_efficientnet_b0.aa_in1k", "tf_efficientnet_b0.ap_in1k", "tf_efficientnet_b0.ns_jft_in1k",
    "tf_efficientnet_b1.aa_in1k", "tf_efficientnet_b1.ap_in1k", "tf_efficientnet_b1.ns_jft_in1k",
    "tf_efficientnet_b2.aa_in1k", "tf_efficientnet_b2.ap_in1k", "tf_efficientnet_b2.ns_jft_in1k",
    "tf_efficientnet_b3.aa_in1k", "tf_efficientnet_b3.ap_in1k", "tf_efficientnet_b3.ns_jft_in1k",
    "tf_efficientnet_b4.aa_in1k", "tf_efficientnet_b4.ap_in1k", "tf_efficientnet_b4.ns_jft_in1k",
    "tf_efficientnet_b5.ap_in1k", "tf_efficientnet_b5.ns_jft_in1k", "tf_efficientnet_b5.ra_in1k",
    "tf_efficientnet_b6.aa_in1k", "tf_efficientnet_b6.ap_in1k", "tf_efficientnet_b6.ns_jft_in1k",
    # MixNet, MnasNet, SPNASNet, FBNet
    "mixnet_s.ft_in1k", "mixnet_m.ft_in1k", "mixnet_l.ft_in1k", "mixnet_xl.ra_in1k",
    "mnasnet_100.rmsp_in1k", "semnasnet_100.rmsp_in1k",
    "spnasnet_100.rmsp_in1k", "fbnetc_100.rmsp_in1k",
]

PAPER_7X7 = [
    "convnextv2_atto.fcmae_ft_in1k",
    "convnextv2_femto.fcmae_ft_in1k",
    "convnextv2_pico.fcmae_ft_in1k",
    "convnextv2_nano.fcmae_ft_in1k",
    "convnextv2_nano.fcmae_ft_in22k_in1k",
    "convnextv2_nano.fcmae_ft_in22k_in1k_384",
    "convnextv2_tiny.fcmae_ft_in1k",
    "convnextv2_tiny.fcmae_ft_in22k_in1k",
    "convnextv2_tiny.fcmae_ft_in22k_in1k_384",
    "convnextv2_base.fcmae_ft_in1k",
    "convnextv2_base.fcmae_ft_in22k_in1k",
    "convnextv2_base.fcmae_ft_in22k_in1k_384",
    "convnextv2_large.fcmae_ft_in1k",
    "convnextv2_large.fcmae_ft_in22k_in1k",
    "convnextv2_large.fcmae_ft_in22k_in1k_384",
    "convnextv2_huge.fcmae_ft_in1k",
    "convnextv2_huge.fcmae_ft_in22k_in1k_384",
    "convnextv2_huge.fcmae_ft_in22k_in1k_512",
    "convnext_tiny.fb_in1k",
    "convnext_tiny.fb_in22k_ft_in1k",
    "convnext_tiny.fb_in22k_ft_in1k_384",
    "convnext_tiny.fb_in22k",
    "convnext_small.fb_in1k",
    "convnext_small.fb_in22k_ft_in1k",
    "convnext_small.fb_in22k_ft_in1k_384",
    "convnext_small.fb_in22k",
    "convnext_base.fb_in1k",
    "convnext_base.fb_in22k_ft_in1k",
    "convnext_base.fb_in22k_ft_in1k_384",
    "convnext_base.fb_in22k",
    "convnext_large.fb_in1k",
    "convnext_large.fb_in22k_ft_in1k",
    "convnext_large.fb_in22k_ft_in1k_384",
    "convnext_large.fb_in22k",
    "convnext_xlarge.fb_in22k_ft_in1k",
    "convnext_xlarge.fb_in22k_ft_in1k_384",
    "convnext_xlarge.fb_in22k",
    "convmixer_768_32.in1k",
]

MISSING_FROM_TIMM = {
    "HorNet tiny/small/base/large":
        "HorNet is not in timm 1.0.31; convert its checkpoints with --checkpoint",
    "MogaNet xtiny..xlarge":
        "MogaNet is not in timm 1.0.31; convert its checkpoints with --checkpoint",
    "RepLKNet-XL (27x27, appendix I)": "RepLKNet is not in timm 1.0.31",
    "ConvMixer 512/20": "timm 1.0.31 has no pretrained convmixer_512_20 weights "
                        "(only 768_32, 1024_20_ks9_p14, 1536_20)",
    "ConvNeXt base 384 1k, large 384 1k": "timm 1.0.31 publishes no fb_in1k 384 weights for these",
    "MnasNet b1": "not published in timm 1.0.31 under that name; semnasnet_100 (MnasNet-A1 "
                  "with SE) stands in",
}

MODEL_SETS = {"paper_5x5": PAPER_5X5, "paper_7x7": PAPER_7X7}
