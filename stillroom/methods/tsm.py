"""``tsm``: teacher score matching (MSD's pre-training of students that cannot start from the teacher).

The student trains as a denoiser whose target is the frozen teacher's clean-sample prediction at the same
noisy point, ``E ||mu_student(x_t, t, c) - mu_teacher(x_t, t, c)||^2`` (spec 11.2), weighted like the
denoising loss (:func:`~stillroom.domains.generative.engine.denoising_loss`); noisy points are made from the
training data as in plain denoising. Its student folder then initialises a one-step student
(``generative.student.path``) and that run's fake-score critic.
"""

from __future__ import annotations

from stillroom.methods.base import Method, MethodContext, MethodPlan


def build(ctx: MethodContext) -> MethodPlan:
    from stillroom.domains.generative.objectives import DenoiseForward, DenoisingObjective
    from stillroom.train.loop import Player

    if ctx.teacher_model is None:
        raise ValueError("method=tsm regresses the teacher's predictions, but the run has no teacher")

    def players(student: Player) -> list[Player]:
        c = ctx.cfg.generative.contrast
        objective = DenoisingObjective(DenoiseForward(ctx.model, 0.0), teacher=ctx.teacher_model,
                                       contrast=(c.weight, c.temperature))
        return [Player(student.name, ctx.model, objective)]

    return MethodPlan(players=players)


METHOD = Method("tsm", build=build, domains=("generative",))
