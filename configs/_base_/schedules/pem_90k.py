# PEM's Cityscapes optimisation (configs/cityscapes/*/Base-*.yaml): as pem_160k.py with AdamW 7e-4
# and cosine decay to 0 over 90k iterations.
_base_ = ['./pem_160k.py']
max_iters = 90000
optim_wrapper = dict(optimizer=dict(lr=7e-4))
param_scheduler = [
    dict(type='CosineAnnealingLR', T_max=max_iters, eta_min=0.0, by_epoch=False, begin=0,
         end=max_iters),
]  # fmt: skip
train_cfg = dict(max_iters=max_iters)
