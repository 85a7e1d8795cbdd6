# A narrow Swin (as the quickstart's) + a narrow PEM head for the synthetic shapes set, trained
# from scratch on CPU. The head keeps PEM's structure (deformable FPN, prototype cross-attention,
# Mask2Former losses) at small widths: 64 channels, 24 queries (up to 7 things + 4 stuff per
# image), 3 decoder layers, 1024 sampled points. Types carry the `effvision.` prefix so that the
# same dicts serve the mmseg (semantic) and the mmdet (panoptic) configs.
norm_cfg = dict(type='BN', requires_grad=True)  # single process: no SyncBN
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
pem_network = dict(
    conv_dim=64,
    mask_dim=64,
    hidden_dim=64,
    num_queries=24,
    num_heads=4,
    dim_feedforward=256,
    num_layers=3,
)
pem_loss = dict(type='effvision.Mask2FormerCriterion', num_points=1024)
embed = dict(lr_mult=1.0, decay_mult=0.0)
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=1.0, norm_type=2),
    paramwise_cfg=dict(
        custom_keys={
            'query_embed': embed,
            'query_feat': embed,
            'level_embed': embed,
            'relative_position_bias_table': embed,
        },
        norm_decay_mult=0.0,
    ),
)
