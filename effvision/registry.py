"""effvision's registries.

Every registry is a child of mmsegmentation's namesake (itself a child of mmengine's), with scope
``effvision``. With ``default_scope='effvision'`` a config reaches our modules by their plain names
and every mmseg/mmengine module through the parent; mmdet modules are siblings and are reached as
``mmdet.Name``. In an mmdet config (``default_scope='mmdet'``), ours are reached as
``effvision.Name``. ``locations`` lists the modules to import the first time a registry is queried:
a third-party package gets no fallback import, so they are mandatory.

We never register a name that already exists upstream: a child registry would silently shadow it.
"""

from mmengine.registry import Registry as MMEngineRegistry
from mmseg.registry import DATA_SAMPLERS as MMSEG_DATA_SAMPLERS
from mmseg.registry import DATASETS as MMSEG_DATASETS
from mmseg.registry import EVALUATOR as MMSEG_EVALUATOR
from mmseg.registry import HOOKS as MMSEG_HOOKS
from mmseg.registry import INFERENCERS as MMSEG_INFERENCERS
from mmseg.registry import LOG_PROCESSORS as MMSEG_LOG_PROCESSORS
from mmseg.registry import LOOPS as MMSEG_LOOPS
from mmseg.registry import METRICS as MMSEG_METRICS
from mmseg.registry import MODEL_WRAPPERS as MMSEG_MODEL_WRAPPERS
from mmseg.registry import MODELS as MMSEG_MODELS
from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMSEG_OPTIM_WRAPPER_CONSTRUCTORS
from mmseg.registry import OPTIM_WRAPPERS as MMSEG_OPTIM_WRAPPERS
from mmseg.registry import OPTIMIZERS as MMSEG_OPTIMIZERS
from mmseg.registry import PARAM_SCHEDULERS as MMSEG_PARAM_SCHEDULERS
from mmseg.registry import RUNNER_CONSTRUCTORS as MMSEG_RUNNER_CONSTRUCTORS
from mmseg.registry import RUNNERS as MMSEG_RUNNERS
from mmseg.registry import TASK_UTILS as MMSEG_TASK_UTILS
from mmseg.registry import TRANSFORMS as MMSEG_TRANSFORMS
from mmseg.registry import VISBACKENDS as MMSEG_VISBACKENDS
from mmseg.registry import VISUALIZERS as MMSEG_VISUALIZERS
from mmseg.registry import WEIGHT_INITIALIZERS as MMSEG_WEIGHT_INITIALIZERS

SCOPE = 'effvision'


class Registry(MMEngineRegistry):
    """A registry that also imports its parent's ``locations`` when it imports its own.

    mmengine looks a plain name up in the parents' tables without importing the modules that
    fill them, so with ``default_scope='effvision'`` a name such as ``SegLocalVisualizer``
    (registered on import of ``mmseg.visualization``) would not be found unless something else
    had imported it first.
    """

    def import_from_location(self) -> None:
        super().import_from_location()
        if self.parent is not None:
            self.parent.import_from_location()


MODELS = Registry(
    'model', parent=MMSEG_MODELS, scope=SCOPE, locations=['effvision.models', 'effvision.deploy']
)
MODEL_WRAPPERS = Registry(
    'model_wrapper', parent=MMSEG_MODEL_WRAPPERS, scope=SCOPE, locations=['effvision.models']
)
WEIGHT_INITIALIZERS = Registry(
    'weight initializer', parent=MMSEG_WEIGHT_INITIALIZERS, scope=SCOPE,
    locations=['effvision.models'],
)  # fmt: skip
TASK_UTILS = Registry(
    'task util', parent=MMSEG_TASK_UTILS, scope=SCOPE, locations=['effvision.models']
)
DATASETS = Registry('dataset', parent=MMSEG_DATASETS, scope=SCOPE, locations=['effvision.datasets'])
DATA_SAMPLERS = Registry(
    'data sampler', parent=MMSEG_DATA_SAMPLERS, scope=SCOPE, locations=['effvision.datasets']
)
TRANSFORMS = Registry(
    'transform', parent=MMSEG_TRANSFORMS, scope=SCOPE, locations=['effvision.datasets']
)
RUNNERS = Registry('runner', parent=MMSEG_RUNNERS, scope=SCOPE, locations=['effvision.engine'])
RUNNER_CONSTRUCTORS = Registry(
    'runner constructor', parent=MMSEG_RUNNER_CONSTRUCTORS, scope=SCOPE,
    locations=['effvision.engine'],
)  # fmt: skip
LOOPS = Registry('loop', parent=MMSEG_LOOPS, scope=SCOPE, locations=['effvision.engine'])
HOOKS = Registry('hook', parent=MMSEG_HOOKS, scope=SCOPE, locations=['effvision.engine'])
OPTIMIZERS = Registry(
    'optimizer', parent=MMSEG_OPTIMIZERS, scope=SCOPE, locations=['effvision.engine']
)
OPTIM_WRAPPERS = Registry(
    'optim_wrapper', parent=MMSEG_OPTIM_WRAPPERS, scope=SCOPE, locations=['effvision.engine']
)
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    'optimizer wrapper constructor', parent=MMSEG_OPTIM_WRAPPER_CONSTRUCTORS, scope=SCOPE,
    locations=['effvision.engine'],
)  # fmt: skip
PARAM_SCHEDULERS = Registry(
    'parameter scheduler', parent=MMSEG_PARAM_SCHEDULERS, scope=SCOPE,
    locations=['effvision.engine'],
)  # fmt: skip
METRICS = Registry('metric', parent=MMSEG_METRICS, scope=SCOPE, locations=['effvision.evaluation'])
EVALUATOR = Registry(
    'evaluator', parent=MMSEG_EVALUATOR, scope=SCOPE, locations=['effvision.evaluation']
)
VISUALIZERS = Registry(
    'visualizer', parent=MMSEG_VISUALIZERS, scope=SCOPE, locations=['effvision.visualization']
)
VISBACKENDS = Registry(
    'vis_backend', parent=MMSEG_VISBACKENDS, scope=SCOPE, locations=['effvision.visualization']
)
LOG_PROCESSORS = Registry(
    'log_processor', parent=MMSEG_LOG_PROCESSORS, scope=SCOPE, locations=['effvision.engine']
)
INFERENCERS = Registry(
    'inferencer', parent=MMSEG_INFERENCERS, scope=SCOPE, locations=['effvision.apis']
)


def _reachable_by_prefix(*registries: Registry) -> None:
    """Make ``effvision.Name`` resolve from any scope, mmdet's included.

    mmengine resolves a prefixed name only among the children of the current registry or of the
    root; ours are grandchildren of the root (below mmseg's), so we also list each one among its
    root's children. Its parent, and so the fallback of plain names to mmseg, is unchanged.
    """
    for registry in registries:
        root = registry._get_root_registry()
        if SCOPE not in root._children:
            root._add_child(registry)


_reachable_by_prefix(
    MODELS, MODEL_WRAPPERS, WEIGHT_INITIALIZERS, TASK_UTILS, DATASETS, DATA_SAMPLERS, TRANSFORMS,
    RUNNERS, RUNNER_CONSTRUCTORS, LOOPS, HOOKS, OPTIMIZERS, OPTIM_WRAPPERS,
    OPTIM_WRAPPER_CONSTRUCTORS, PARAM_SCHEDULERS, METRICS, EVALUATOR, VISUALIZERS, VISBACKENDS,
    LOG_PROCESSORS, INFERENCERS,
)  # fmt: skip
