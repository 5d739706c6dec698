"""Pre-training objectives: CoT-MAE encoder/decoder MLM and the DupMAE bag-of-words loss."""

from mote_jax.objectives.decoder import (CotMaeDecoder, decoder_config, decoder_params_from_encoder,
                                         init_decoder_params)
from mote_jax.objectives.losses import (BERT_UNCASED_SPECIAL_IDS, IGNORE_INDEX, bow_loss, bow_representation,
                                        bow_targets, dropped_predictions, gather_masked, ordinary_token_mask,
                                        restore_input_ids, token_cross_entropy,
                                        token_cross_entropy_terms)
from mote_jax.objectives.pretrain import BATCH_FIELDS, ObjectiveConfig, PretrainModel, Stream, finalize

__all__ = [
    "BATCH_FIELDS", "BERT_UNCASED_SPECIAL_IDS", "CotMaeDecoder", "IGNORE_INDEX", "ObjectiveConfig",
    "PretrainModel", "Stream", "bow_loss", "bow_representation", "bow_targets", "decoder_config",
    "decoder_params_from_encoder", "dropped_predictions", "finalize", "gather_masked", "init_decoder_params",
    "ordinary_token_mask", "restore_input_ids", "token_cross_entropy", "token_cross_entropy_terms",
]
