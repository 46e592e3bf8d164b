# Copyright 2025 Bytedance Ltd. and/or its affiliates
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Noise injection for 4-bit quantized model training.
Adapted from QeRL for veRL with MoE expert-only targeting.
"""

import torch
import logging

logger = logging.getLogger(__name__)


def get_sigma_by_step(step, total_steps, sigma_trend):
    """
    Calculate noise standard deviation based on current training step.

    Args:
        step: Current training step
        total_steps: Total number of training steps
        sigma_trend: List of sigma values for each interval

    Returns:
        Tuple of (sigma_id, sigma value)
    """
    step = min(step, total_steps)

    num_intervals = len(sigma_trend) + 1
    steps_per_interval = total_steps / num_intervals

    interval_id = int(step // steps_per_interval)

    if interval_id == 0:
        return interval_id, 0

    sigma_id = interval_id - 1
    sigma_id = min(sigma_id, len(sigma_trend) - 1)

    sigma = sigma_trend[sigma_id]
    return sigma_id, sigma


def _detect_moe_model(model):
    """
    Auto-detect if model is MoE by checking for expert modules.

    Returns:
        True if MoE model detected, False for dense models

    Note:
        We specifically check for 'experts' (plural) to distinguish from
        dense models that have 'gate_proj' in SwiGLU MLP (not MoE gate).
        We also check for 'shared_expert' which is specific to MoE.
    """
    # More specific MoE indicators (avoid false positives from gate_proj)
    moe_indicators = ['experts', 'shared_expert', 'num_experts', 'expert_']
    for name, _ in model.named_modules():
        name_lower = name.lower()
        if any(indicator in name_lower for indicator in moe_indicators):
            return True
    return False


def generate_expert_gaussian_noise(model, step, total_step, sigma_trend, target_modules=None, exclude_patterns=None, is_moe=None, verbose=True, layer_types=None, layer_sigma_config=None):
    """
    Generate and apply Gaussian noise to model layers for quantization-aware training.

    Behavior differs based on model type and layer_types:

    For MoE models (is_moe=True):
        - Only targets post_attention_layernorm (after router/MLP)
        - Excludes input_layernorm (before router)
        - Avoids affecting router decisions (expert selection mismatch)

    For Dense models (is_moe=False):
        - Targets ALL RMSNorm layers (QeRL original behavior)
        - No exclusions
        - Follows QeRL paper's approach for quantized training

    Layer Types (NEW):
        - layer_types=['rmsnorm']: Target RMSNorm only (QeRL default)
        - layer_types=['linear']: Target Linear only (align with W4A16 quantization)
        - layer_types=['rmsnorm', 'linear']: Target both

    SRDD-Guided Layer-Specific Sigma (NEW):
        - layer_sigma_config: Dict with layer-specific sigma multipliers
        - Allows different noise levels based on SRDD error analysis
        - High-error layers get higher sigma, low-error layers get lower

    Zone-Based Scheduling (E14a):
        - Use zone_schedule config for temporal phase-based multipliers
        - Edge layers (0-5, 23-27): Always full noise (resilient)
        - Middle layers (6-22): Full noise early, reduced late (protect vulnerable)
        - Maintains gradient consistency during rapid learning phase

    Args:
        model: The model to inject noise into (typically vLLM inference model)
        step: Current training step
        total_step: Total training steps
        sigma_trend: List of sigma values for exponential decay schedule
        target_modules: List of module name patterns to target (None = auto based on is_moe)
        exclude_patterns: List of patterns to exclude (None = auto based on is_moe)
        is_moe: Whether model is MoE (None = auto-detect)
        verbose: Whether to print noise injection info
        layer_types: List of layer types to target ['rmsnorm', 'linear'] (None = ['rmsnorm'])
        layer_sigma_config: Dict for SRDD-guided layer-specific sigma (optional):
            {
                "enabled": True,
                "default_multiplier": 1.0,  # Default for unlisted layers
                "layer_multipliers": {
                    "14": 1.5, "15": 1.5, "16": 1.5, "17": 1.5,  # High error
                    "10": 1.2, "11": 1.2, ...  # Medium error
                },
                "zone_schedule": {  # E14a zone-based scheduling (optional)
                    "enabled": True,
                    "edge_layers": [0, 1, 2, 3, 4, 5, 23, 24, 25, 26, 27],
                    "middle_layers": [6, 7, 8, ..., 22],
                    "phase_boundary_ratio": 0.5,  # Switch phase at 50% of training
                    "early_middle_mult": 1.0,  # Full noise early
                    "late_middle_mult": 0.5,  # Half noise late
                }
            }

    Example:
        >>> # Auto-detect model type (recommended)
        >>> generate_expert_gaussian_noise(model, step=100, total_step=1000, sigma_trend=sigma_trend)
        >>>
        >>> # Target Linear layers (align with W4A16 MXFP4 quantization)
        >>> generate_expert_gaussian_noise(model, step=100, total_step=1000, sigma_trend=sigma_trend, layer_types=['linear'])
        >>>
        >>> # Force MoE model behavior
        >>> generate_expert_gaussian_noise(model, step=100, total_step=1000, sigma_trend=sigma_trend, is_moe=True)
        >>>
        >>> # SRDD-guided layer-specific sigma (E9b)
        >>> srdd_config = {"enabled": True, "layer_multipliers": {"14": 1.5, "15": 1.5}}
        >>> generate_expert_gaussian_noise(model, step=100, total_step=1000, sigma_trend=sigma_trend, layer_sigma_config=srdd_config)
    """
    # Auto-detect model type if not specified
    if is_moe is None:
        is_moe = _detect_moe_model(model)

    # Set defaults based on model type
    if target_modules is None:
        if is_moe:
            target_modules = ["post_attention_layernorm"]  # MoE: only post-attention norms
        else:
            target_modules = []  # Dense: all RMSNorm (QeRL original)

    if exclude_patterns is None:
        if is_moe:
            exclude_patterns = ["input_layernorm"]  # MoE: exclude input norms (before router)
        else:
            exclude_patterns = []  # Dense: no exclusions (QeRL original)

    sigma_id, sigma = get_sigma_by_step(step, total_step, sigma_trend)

    # SRDD-guided layer-specific sigma setup
    use_layer_sigma = layer_sigma_config is not None and layer_sigma_config.get("enabled", False)
    default_multiplier = 1.0
    layer_multipliers = {}

    # Zone-based scheduling support (E14a)
    use_zone_schedule = False
    edge_layers = set()
    middle_layers = set()
    phase_boundary_ratio = 0.5
    early_middle_mult = 1.0
    late_middle_mult = 0.5

    if use_layer_sigma:
        default_multiplier = layer_sigma_config.get("default_multiplier", 1.0)
        layer_multipliers = layer_sigma_config.get("layer_multipliers", {})

        # Check for zone-based scheduling (E14a style)
        zone_config = layer_sigma_config.get("zone_schedule", None)
        if zone_config is not None and zone_config.get("enabled", False):
            use_zone_schedule = True
            edge_layers = set(zone_config.get("edge_layers", [0, 1, 2, 3, 4, 5, 23, 24, 25, 26, 27]))
            middle_layers = set(zone_config.get("middle_layers", list(range(6, 23))))
            phase_boundary_ratio = zone_config.get("phase_boundary_ratio", 0.5)
            early_middle_mult = zone_config.get("early_middle_mult", 1.0)
            late_middle_mult = zone_config.get("late_middle_mult", 0.5)

    if verbose and torch.distributed.is_initialized():
        if torch.distributed.get_rank() == 0:
            model_type = "MoE" if is_moe else "Dense"
            target_desc = target_modules if target_modules else "ALL"
            layer_type_desc = layer_types if layer_types else ["rmsnorm"]
            srdd_desc = f", SRDD-guided={len(layer_multipliers)} layers" if use_layer_sigma else ""
            # Zone-based scheduling info
            if use_zone_schedule:
                phase_boundary_step = int(total_step * phase_boundary_ratio)
                is_late_phase = step >= phase_boundary_step
                phase_name = "LATE" if is_late_phase else "EARLY"
                zone_desc = f", Zone={phase_name}(mid_mult={late_middle_mult if is_late_phase else early_middle_mult})"
            else:
                zone_desc = ""
            # Use print() to ensure visibility regardless of logging level
            print(f"[AQN] Noise injection ({model_type}) - Step: {step}/{total_step}, Sigma ID: {sigma_id}, Sigma: {sigma:.6f}, LayerTypes: {layer_type_desc}, Target: {target_desc}{srdd_desc}{zone_desc}")

    if sigma == 0:
        return

    # Default layer_types to ['rmsnorm'] for backward compatibility (QeRL default)
    if layer_types is None:
        layer_types = ['rmsnorm']

    # Helper: extract layer index from module name
    import re
    def _extract_layer_idx(name):
        """
        Extract layer index from module name.
        Examples:
            'model.layers.14.post_attention_layernorm' -> 14
            'model.layers.7.mlp.gate_proj' -> 7
            'transformer.h.3.ln_1' -> 3
        Returns None if no layer index found.
        """
        # Common patterns: layers.N, h.N, blocks.N
        patterns = [
            r'layers\.(\d+)\.',      # Qwen, LLaMA style
            r'h\.(\d+)\.',           # GPT-2 style
            r'blocks\.(\d+)\.',      # Some other models
            r'layer\.(\d+)\.',       # Generic
        ]
        for pattern in patterns:
            match = re.search(pattern, name)
            if match:
                return int(match.group(1))
        return None

    def _get_sigma_for_layer(name, base_sigma):
        """Get sigma for a specific layer, applying SRDD-guided multiplier if configured."""
        if not use_layer_sigma:
            return base_sigma

        layer_idx = _extract_layer_idx(name)

        # Zone-based scheduling (E14a): different multipliers based on training phase
        if use_zone_schedule and layer_idx is not None:
            # Determine current phase based on step
            phase_boundary_step = int(total_step * phase_boundary_ratio)
            is_late_phase = step >= phase_boundary_step

            # Edge layers always get full noise (multiplier 1.0)
            if layer_idx in edge_layers:
                return base_sigma * 1.0
            # Middle layers: full noise in early phase, reduced in late phase
            elif layer_idx in middle_layers:
                if is_late_phase:
                    return base_sigma * late_middle_mult
                else:
                    return base_sigma * early_middle_mult
            else:
                # Unlisted layers get default multiplier
                return base_sigma * default_multiplier

        # Static layer multipliers (E13l/m/n style)
        if layer_idx is not None:
            # Try to find multiplier by layer index (both string and int keys for Hydra compat)
            layer_key = str(layer_idx)
            if layer_key in layer_multipliers:
                multiplier = layer_multipliers[layer_key]
            elif layer_idx in layer_multipliers:
                multiplier = layer_multipliers[layer_idx]
            else:
                multiplier = default_multiplier
        else:
            multiplier = default_multiplier

        return base_sigma * multiplier

    # Detect RMSNorm by class name (works with vLLM's model implementations)
    # vLLM uses its own model classes, not transformers', so we check class name
    def _is_rmsnorm(module):
        """Check if module is an RMSNorm layer by class name and structure."""
        class_name = module.__class__.__name__.lower()
        # Check for RMSNorm in class name (handles Qwen2RMSNorm, LlamaRMSNorm, etc.)
        if 'rmsnorm' not in class_name:
            return False
        # Verify it has a weight parameter (all RMSNorm layers have this)
        if not hasattr(module, 'weight'):
            return False
        if not isinstance(module.weight, torch.Tensor):
            return False
        return True

    def _is_linear(module):
        """Check if module is a Linear layer by class name and structure."""
        class_name = module.__class__.__name__
        # Check for Linear in class name (handles nn.Linear, ColumnParallelLinear, etc.)
        if 'Linear' not in class_name:
            return False
        # Verify it has a weight parameter
        if not hasattr(module, 'weight'):
            return False
        if not isinstance(module.weight, torch.Tensor):
            return False
        # Linear layers should have 2D weights
        if module.weight.dim() < 2:
            return False
        return True

    def _should_target_module(module, name):
        """Check if module should be targeted based on layer_types and patterns."""
        # Check layer type
        is_target_type = False
        if 'rmsnorm' in layer_types and _is_rmsnorm(module):
            is_target_type = True
        if 'linear' in layer_types and _is_linear(module):
            is_target_type = True

        if not is_target_type:
            return False, "type_mismatch"

        # Check exclusion patterns
        if exclude_patterns and any(pattern in name for pattern in exclude_patterns):
            return False, "excluded"

        # Check target patterns (if specified)
        if target_modules and not any(pattern in name for pattern in target_modules):
            return False, "not_targeted"

        return True, "matched"

    noise_count = 0
    skipped_count = 0
    type_mismatch_count = 0

    for name, module in model.named_modules():
        should_target, reason = _should_target_module(module, name)

        if not should_target:
            if reason == "type_mismatch":
                type_mismatch_count += 1
            else:
                skipped_count += 1
            continue

        weight_tensor = module.weight

        # Get layer-specific sigma (SRDD-guided if configured)
        layer_sigma = _get_sigma_for_layer(name, sigma)

        # Skip if layer sigma is 0 (for targeted AQN)
        if layer_sigma == 0:
            skipped_count += 1
            continue

        # Generate noise
        noise = torch.normal(
            mean=0,
            std=layer_sigma,
            size=weight_tensor.shape,
            dtype=torch.float32
        ).to(weight_tensor.device)

        # Convert to module dtype
        noise = noise.to(weight_tensor.dtype)

        # Apply noise in-place
        with torch.no_grad():
            module.weight.add_(noise)

        noise_count += 1

        if verbose and noise_count <= 3:  # Log first few for debugging
            layer_idx = _extract_layer_idx(name)
            if use_layer_sigma:
                logger.debug(f"Applied noise to: {name} (layer={layer_idx}, sigma={layer_sigma:.6f})")
            else:
                logger.debug(f"Applied noise to: {name}")

    if verbose and torch.distributed.is_initialized():
        if torch.distributed.get_rank() == 0:
            # Use print() to ensure visibility regardless of logging level
            layer_type_str = "+".join(layer_types)
            srdd_suffix = " (SRDD-guided)" if use_layer_sigma else ""
            print(f"[AQN] Applied noise to {noise_count} {layer_type_str} layers (skipped {skipped_count} excluded layers){srdd_suffix}")


def get_sigma_schedule(sigma_start=0.01, sigma_end=0.001, num_stages=10):
    """
    Generate exponential decay schedule for noise standard deviation.

    Args:
        sigma_start: Starting sigma value
        sigma_end: Ending sigma value
        num_stages: Number of stages (intervals + 1)

    Returns:
        List of sigma values

    Example:
        >>> schedule = get_sigma_schedule(0.01, 0.001, 10)
        >>> # Returns [0.01, 0.0075, 0.0056, ..., 0.001] (9 values for 10 stages)
    """
    import numpy as np

    if num_stages <= 1:
        return []

    sigma_decay_schedule_np = sigma_start * (sigma_end / sigma_start) ** (
        np.arange(num_stages - 1) / (num_stages - 2)
    )
    return sigma_decay_schedule_np.tolist()


def get_epoch_aware_sigma_schedule(sigma_start=0.05, sigma_end=0.0005, num_epochs=2, stages_per_epoch=5):
    """
    Generate epoch-aware sigma schedule (Option C).

    Each epoch has its own sigma range with exponential decay within the epoch.
    This ensures meaningful noise levels throughout all epochs.

    Args:
        sigma_start: Starting sigma for epoch 1
        sigma_end: Ending sigma for final epoch
        num_epochs: Number of training epochs
        stages_per_epoch: Number of decay stages per epoch

    Returns:
        List of (epoch_ranges, stages_per_epoch) where epoch_ranges is list of (start, end) tuples

    Example for 2 epochs:
        Epoch 1: 0.05 → 0.01 (exploration)
        Epoch 2: 0.01 → 0.0005 (refinement)
    """
    import numpy as np

    if num_epochs <= 0:
        return [], stages_per_epoch

    # Calculate intermediate sigma values at epoch boundaries
    # Using exponential decay: sigma_i = sigma_start * (sigma_end/sigma_start)^(i/num_epochs)
    epoch_boundaries = [
        sigma_start * (sigma_end / sigma_start) ** (i / num_epochs)
        for i in range(num_epochs + 1)
    ]

    # Create ranges for each epoch
    epoch_ranges = [
        (epoch_boundaries[i], epoch_boundaries[i + 1])
        for i in range(num_epochs)
    ]

    return epoch_ranges, stages_per_epoch


def get_sigma_by_step_epoch_aware(step, steps_per_epoch, epoch_ranges, stages_per_epoch, current_epoch=None):
    """
    Calculate sigma for epoch-aware decay schedule (Option C).

    Args:
        step: Current global training step
        steps_per_epoch: Number of steps in one epoch
        epoch_ranges: List of (sigma_start, sigma_end) tuples per epoch
        stages_per_epoch: Number of decay stages per epoch
        current_epoch: Current epoch (0-indexed), auto-calculated if None

    Returns:
        Tuple of (stage_id, sigma value)
    """
    import numpy as np

    if not epoch_ranges:
        return 0, 0

    # Calculate current epoch if not provided
    if current_epoch is None:
        current_epoch = min(step // steps_per_epoch, len(epoch_ranges) - 1)

    # Get sigma range for current epoch
    sigma_start, sigma_end = epoch_ranges[current_epoch]

    # Calculate step within current epoch
    step_in_epoch = step % steps_per_epoch

    # Calculate intervals within epoch (including warmup)
    num_intervals = stages_per_epoch + 1  # +1 for warmup
    steps_per_interval = steps_per_epoch / num_intervals

    interval_id = int(step_in_epoch // steps_per_interval)

    # Warmup: first interval of each epoch has sigma=0
    if interval_id == 0:
        return (current_epoch * stages_per_epoch), 0

    # Calculate sigma with exponential decay within epoch
    stage_in_epoch = interval_id - 1
    stage_in_epoch = min(stage_in_epoch, stages_per_epoch - 1)

    if stages_per_epoch <= 1:
        sigma = sigma_start
    else:
        # Exponential decay within epoch
        decay_factor = (sigma_end / sigma_start) ** (stage_in_epoch / (stages_per_epoch - 1))
        sigma = sigma_start * decay_factor

    global_stage_id = current_epoch * stages_per_epoch + stage_in_epoch
    return global_stage_id, sigma


__all__ = [
    "generate_expert_gaussian_noise",
    "get_sigma_by_step",
    "get_sigma_schedule",
    "get_epoch_aware_sigma_schedule",
    "get_sigma_by_step_epoch_aware",
]
