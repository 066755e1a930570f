"""decalign: decoding-time alignment of language models (CARDS, CoLD, Best-of-N, ...)."""

from .api import generate, get_engine
from .engine import Batch, Engine, EntropyStop, Segment
from .errors import DecalignError
from .methods import method_names
from .result import Candidate, Result
from .rewards import Reward, load_reward
from .sampling import Sampling

__version__ = "0.1.0"

__all__ = [
    "generate", "get_engine", "Engine", "Batch", "EntropyStop", "Segment", "DecalignError",
    "method_names", "Result", "Candidate", "Reward", "load_reward", "Sampling", "__version__",
]
