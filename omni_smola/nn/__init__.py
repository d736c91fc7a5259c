"""Adapter layers: the hook (`AdaptedDense`), the plan and its specs, the adapter families."""
from omni_smola.nn.adapted_dense import AdaptedDense, build_adapter
from omni_smola.nn.adapter_plan import NO_ADAPTERS, SLOT_NAMES, AdapterPlan
from omni_smola.nn.adapter_spec import ADAPTER_KINDS, AdapterConfigError, AdapterSpec
from omni_smola.nn.lora import LoRA
from omni_smola.nn.mixlora import MixLoRA
from omni_smola.nn.mole import MoLE
from omni_smola.nn.omni_smola import OmniSMoLA
from omni_smola.nn.smola import SMoLAGroup
from omni_smola.nn.token_context import TokenContext
