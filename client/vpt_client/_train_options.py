"""Training options: generated from vpt/options.py by `python -m vpt.options --write`; do not edit.

The server's OpenAPI (the train request body) describes the same fields; a test checks both.
"""
from __future__ import annotations

from typing import Any, Literal, TypedDict


class TrainOptions(TypedDict, total=False):
    """Training options, sent as form fields; the server fills in what is left out."""

    method: str
    head: str
    pooling: Literal['cls', 'image_mean', 'prompt_mean', 'all_mean']
    prompt_layers: str
    adapter_reduction: int
    auto_methods: list[str]
    num_prompts: int
    epochs: int
    batch_size: int
    base_lr: float
    weight_decay: float
    warmup_epochs: int
    prompt_dropout: float
    augmentation: Literal['fgvc', 'none']
    sweep: Literal['none', 'small', 'paper']
    seed: int
    val_fraction: float
    keep: Literal['best', 'last']
    mixed_precision: Literal['auto', 'bf16', 'off']
    num_workers: int


FIELDS: dict[str, dict[str, Any]] = {
    'method': {'default': 'vpt-deep',
               'description': 'what learns besides the head: linear (nothing), or +-joined components of '
                              'vpt-shallow|vpt-deep, bias, adapter, partial-1 (e.g. vpt-deep+bias); auto '
                              'trains auto_methods and keeps the best on validation',
               'examples': ['linear',
                            'vpt-shallow',
                            'vpt-deep',
                            'bias',
                            'adapter',
                            'partial-1',
                            'vpt-deep+bias',
                            'auto'],
               'type': 'string',
               'x-flag': 'method'},
    'head': {'default': 'linear',
             'description': 'the head: linear, or mlp-k (k in 2..8: k-1 hidden layers)',
             'type': 'string',
             'x-flag': 'head'},
    'pooling': {'default': 'cls',
                'description': 'features the head reads: cls, image_mean, prompt_mean or all_mean',
                'enum': ['cls', 'image_mean', 'prompt_mean', 'all_mean'],
                'type': 'string',
                'x-flag': 'pooling'},
    'prompt_layers': {'description': 'vpt-deep: blocks i-j (inclusive) that get prompts; default all',
                      'type': 'string',
                      'x-flag': 'prompt_layers'},
    'adapter_reduction': {'default': 64,
                          'description': 'adapter bottleneck d/r (the paper: 8, 64, 256)',
                          'maximum': 4096,
                          'minimum': 1,
                          'type': 'integer',
                          'x-flag': 'adapter_reduction'},
    'auto_methods': {'description': 'method auto: the candidate methods (comma-separated in a form)',
                     'items': {'type': 'string'},
                     'maxItems': 16,
                     'minItems': 1,
                     'type': 'array',
                     'x-flag': 'auto_methods'},
    'num_prompts': {'default': 10,
                    'description': 'prompt tokens per layer (ignored for linear)',
                    'maximum': 1024,
                    'minimum': 1,
                    'type': 'integer',
                    'x-flag': 'prompts'},
    'epochs': {'default': 100,
               'description': 'passes over the training images',
               'maximum': 10000,
               'minimum': 1,
               'type': 'integer',
               'x-flag': 'epochs'},
    'batch_size': {'default': 64,
                   'description': 'images per optimizer step',
                   'maximum': 65536,
                   'minimum': 1,
                   'type': 'integer',
                   'x-flag': 'batch_size'},
    'base_lr': {'default': 1.0,
                'description': 'base learning rate; SGD uses base_lr * batch_size / 256',
                'exclusiveMinimum': 0,
                'maximum': 10000.0,
                'type': 'number',
                'x-flag': 'lr'},
    'weight_decay': {'default': 0.001,
                     'description': 'L2 weight decay on prompts and head weight',
                     'maximum': 1.0,
                     'minimum': 0,
                     'type': 'number',
                     'x-flag': 'weight_decay'},
    'warmup_epochs': {'description': 'linear warmup epochs before cosine decay (at most epochs); default 10% '
                                     'of the epochs',
                      'maximum': 10000,
                      'minimum': 0,
                      'type': 'integer',
                      'x-flag': 'warmup_epochs'},
    'prompt_dropout': {'description': 'dropout on prompt tokens; default 0.1 for vpt-deep, 0 for vpt-shallow',
                       'exclusiveMaximum': 1,
                       'minimum': 0,
                       'type': 'number',
                       'x-flag': 'prompt_dropout'},
    'augmentation': {'default': 'fgvc',
                     'description': 'training augmentation: random resized crop and flip (fgvc), or none',
                     'enum': ['fgvc', 'none'],
                     'type': 'string',
                     'x-flag': 'augmentation'},
    'sweep': {'default': 'none',
              'description': 'grid search over base_lr x weight_decay scored on validation accuracy: none, '
                             'small (6 runs) or paper (36 runs); the winner is kept',
              'enum': ['none', 'small', 'paper'],
              'type': 'string',
              'x-flag': 'sweep'},
    'seed': {'default': 0,
             'description': 'seed of initialisation, batch order and augmentation',
             'maximum': 9223372036854775807,
             'minimum': 0,
             'type': 'integer',
             'x-flag': 'seed'},
    'val_fraction': {'default': 0.1,
                     'description': 'share of images held out for validation when the dataset has no val '
                                    'split',
                     'exclusiveMaximum': 1,
                     'minimum': 0,
                     'type': 'number',
                     'x-flag': 'val_fraction'},
    'keep': {'default': 'best',
             'description': 'keep the best epoch by validation accuracy, or the last epoch',
             'enum': ['best', 'last'],
             'type': 'string',
             'x-flag': 'keep'},
    'mixed_precision': {'default': 'auto',
                        'description': 'bf16 autocast: auto (on CUDA only), bf16 (always) or off',
                        'enum': ['auto', 'bf16', 'off'],
                        'type': 'string',
                        'x-flag': 'mixed_precision'},
    'num_workers': {'default': 0,
                    'description': 'data-loading worker processes (0: load in the training thread)',
                    'maximum': 64,
                    'minimum': 0,
                    'type': 'integer',
                    'x-flag': 'workers'},
}
