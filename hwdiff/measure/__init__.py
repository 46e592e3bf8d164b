"""Measurements on a live model, above the injector: each norm's sub-block gain and the closed-loop
verify (:mod:`.sigma_probe`), the policy-level check (:mod:`.policy_check`), the robustness run and
its card (:mod:`.robustness_run`, :mod:`.robustness_card`), and ``hwdiff.calibrate`` — the calibrate
orchestration that measures, computes σ and checks it (:mod:`.calibrate_run`)."""
