"""AST: dataset distillation by trajectory matching with smooth experts (``stillroom distill-data``).

* :mod:`.losses`: the pure loss pieces (clipping factor, input-gradient penalty, balanced factor,
  normalised parameter distance, weight perturbation);
* :mod:`.realdata`: the real images of a classifier data set, standardised;
* :mod:`.experts`: expert trajectories (parameters after every epoch), trained once and cached;
* :mod:`.unroll`: the differentiable inner SGD on the synthetic set (``torch.func.functional_call``);
* :mod:`.synthetic`: the synthetic set and the learnable lr (the player's model), its initialisations;
* :mod:`.player`: the outer objective and player trained by the one loop (checkpoints, exact resume);
* :mod:`.evaluate`: fresh networks trained on a set, test accuracy, image grids;
* :mod:`.command`: ``stillroom distill-data``: run folder, experts, the loop, evaluation, report.
"""
