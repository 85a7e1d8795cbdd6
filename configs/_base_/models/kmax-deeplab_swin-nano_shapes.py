# A narrow Swin (as the quickstart's) + a small kMaX-DeepLab head for the synthetic shapes set,
# trained from scratch on CPU: one axial block per axial stage, narrow pixel-decoder stages, one
# kMaX layer per stride (the transformer decoder's widths are fixed by the architecture: 256-d
# queries, 2048-d FFN), 24 queries (up to 7 things + 4 stuff per image), 256 sampled pixels for
# the instance-discrimination and aux-semantic losses. Types carry the `effvision.` prefix so the
# same dicts serve the mmseg (semantic) and mmdet (panoptic) configs.
norm_cfg = dict(type='BN', eps=1e-3, momentum=0.01, requires_grad=True)  # one process
backbone = dict(
    type='effvision.Swin',
    arch=None,
    embed_dim=32,
    depths=(2, 2, 2, 2),
    num_heads=(1, 2, 4, 8),
    window_size=8,
    mlp_ratio=4.0,
    qkv_bias=True,
    drop_path_rate=0.1,
    patch_norm=True,
    out_indices=(0, 1, 2, 3),
)
kmax_pixel_decoder = dict(
    dec_layers=(1, 1, 1, 1),
    dec_channels=(64, 32, 32, 16),
    layer_types=('axial', 'axial', 'bottleneck', 'bottleneck'),
)
kmax_transformer_decoder = dict(dec_layers=(1, 1, 1), drop_path_rate=0.0, aux_semantic_head='aspp')
kmax_loss = dict(type='effvision.KMaXCriterion', insdis_sample_k=256, aux_semantic_sample_k=256)
no_decay = dict(decay_mult=0.0)
# The official init sets the scale of every predictor's mask-logit BN to 0.1, so the mask logits
# start nearly equal across queries; Adam moves that scale by about the lr per step, and at lr
# 1e-3 a few hundred iterations leave it near 0.3: the softmax over the queries then stays below
# kMaX's 0.4 pixel threshold everywhere and panoptic merging pastes nothing (measured: PQ 0 after
# 400 iterations at 64x64, mask-logit std 0.29). Ten times the lr on that norm (its bias cancels
# in the softmax) lets the short CPU schedules reach confident masks; published configs keep 1x.
mask_scale_lr = dict(lr_mult=10.0, decay_mult=0.0)
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=1.0, norm_type=2),
    paramwise_cfg=dict(
        custom_keys={
            '_rpe': no_decay,
            'cluster_centers': no_decay,
            'in_norms': no_decay,
            'relative_position_bias_table': no_decay,
            'pixel_space_mask_batch_norm': mask_scale_lr,
        },
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
    ),
)
