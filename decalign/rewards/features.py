"""The feature sets a harmlessness head can be trained on (its config.json names one), apart from
the embedder so that the command line can list them without loading torch."""

JOINED = "u,a,u*a,|u-a|,joined"  # + the user turn and the answer embedded as one input: 3 embedder passes
LOG_LENGTH = "u,a,u*a,|u-a|,log_length"  # + log(1 + answer tokens) / LOG_LENGTH_SCALE: 2 passes
LOWER_LAYER = 0  # a0's layer: of layers 0, 1 and 2 (each helped), 0 did best by nested CV (docs/rewards.md)
LAYERED = LOG_LENGTH + f",a_layer{LOWER_LAYER}"  # + the answer pooled at LOWER_LAYER, from the same pass
FEATURE_SETS = (LAYERED, LOG_LENGTH, JOINED)
FEATURES = LAYERED  # train_reward's default
