"""The training core shared by head runs (:mod:`conilium.heads`) and end-to-end fine-tuning
(:mod:`conilium.finetune`): the fields every run shares and their option metadata
(:mod:`.config`), losses (:mod:`.losses`), the class-balanced sampler (:mod:`.samplers`),
the epoch loop with best-epoch selection and the optimiser policy (:mod:`.loop`), random
streams and checkpoint files (:mod:`.state`)."""
