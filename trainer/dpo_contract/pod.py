"""The pod's side of the contract: the files mounted at /etc/dpo, the environment variables,
the ports and the exit codes, with the errors that map to them.
"""

from __future__ import annotations

# Files mounted into every pod from the DPOJob's ConfigMap.
CONFIG_DIR = "/etc/dpo"
TRAINER_CONFIG_FILE = "trainer.json"
ACCELERATE_CONFIG_FILE = "accelerate.yaml"
TRAINER_CONFIG_PATH = f"{CONFIG_DIR}/{TRAINER_CONFIG_FILE}"
ACCELERATE_CONFIG_PATH = f"{CONFIG_DIR}/{ACCELERATE_CONFIG_FILE}"
TERMINATION_LOG = "/dev/termination-log"
# Where the short JSON summary goes; tests and `dpo run` point it elsewhere.
ENV_TERMINATION_LOG = "DPO_TERMINATION_LOG"

# Environment variables every training pod receives.
ENV_JOB = "DPO_JOB"
ENV_NAMESPACE = "DPO_NAMESPACE"
ENV_NNODES = "NNODES"
ENV_NPROC_PER_NODE = "NPROC_PER_NODE"
ENV_NODE_RANK = "NODE_RANK"
ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
ENV_METRICS_PORT = "DPO_METRICS_PORT"
# The pod's own name and its node's (downward API): the fabric checks name them.
ENV_POD_NAME = "DPO_POD_NAME"
ENV_NODE_NAME = "DPO_NODE_NAME"
# Directories the launcher puts before the image's LD_LIBRARY_PATH (a node's NCCL and plugin).
ENV_LIBRARY_PATH = "DPO_LIBRARY_PATH"

# Every variable of the pod contract: the operator sets them, and no user env source may (a
# user MASTER_ADDR would send every rank to a host the manifest names; a user termination-log
# path would turn a passed gate into "the gate could not run").
CONTRACT_ENV = (
    ENV_TERMINATION_LOG,
    ENV_JOB,
    ENV_NAMESPACE,
    ENV_NNODES,
    ENV_NPROC_PER_NODE,
    ENV_NODE_RANK,
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_METRICS_PORT,
    ENV_POD_NAME,
    ENV_NODE_NAME,
    ENV_LIBRARY_PATH,
    # What torch.distributed reads (set for CPU pods; torchrun sets them on GPUs).
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
)

DEFAULT_MASTER_PORT = 29500
DEFAULT_METRICS_PORT = 9400

# Exit codes: the operator decides whether to retry from these alone.
EXIT_OK = 0
EXIT_BAD_INPUT = 2  # bad config or data: retrying cannot help
EXIT_GATE_REJECTED = 3  # eval only: the adapter failed a gate criterion
# The pod's devices or distributed setup differ from what was rendered (no CUDA where GPUs were
# asked for, fewer GPUs, a strategy the launcher did not keep): the run stops before training.
EXIT_WRONG_ENVIRONMENT = 4
# promote only: another run promoted to the target after this one's gate compared with the
# adapter promoted then; the verdict no longer holds (never retried).
EXIT_CHAMPION_CHANGED = 5


class BadInputError(Exception):
    """Bad config or data: the trainer exits with EXIT_BAD_INPUT and the run is never retried.

    The message names the file (and row and column, for data) and says what to do.
    """


class ChampionChangedError(Exception):
    """The gate beat an adapter that is no longer the promoted one: the trainer exits with
    EXIT_CHAMPION_CHANGED and the run is not promoted."""


class WrongEnvironmentError(Exception):
    """What runs differs from what was rendered: the trainer exits with EXIT_WRONG_ENVIRONMENT.

    The message says what was expected, what was found, and what to change.
    """


class FabricError(WrongEnvironmentError):
    """The network under the pods is not what the profile promised: NCCL on another transport
    (`FabricMismatch`), or a preflight below `network.preflight.minBusBandwidthGBps`
    (`FabricSlow`). The reason becomes the DPOJob's condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
