"""Saved training configurations read back: today's names, and names saved before a rename."""
from dataclasses import replace
from pathlib import Path

from training.config import FULL, TINY, LossWeights, TrainConfig, config_dict, config_from_dict, saved_config


def test_a_saved_configuration_reads_back_as_the_same_config():
    for cfg in (TINY, FULL, TrainConfig(init_from=Path("/models/m1"), task_weights=True,
                                        loss_weights=LossWeights(cls=1.0))):
        assert config_from_dict(config_dict(cfg)) == cfg


def test_the_old_task_weights_key_and_augmentation_name_load_as_the_new_ones():
    old = {k: v for k, v in config_dict(TINY).items() if k != "task_weights"}
    old.update(seed_002_task_weights=True, augment="seed")
    assert saved_config(old)["task_weights"] is True and "seed_002_task_weights" not in saved_config(old)
    cfg = config_from_dict(old)
    assert cfg.task_weights is True and cfg.augment == "full"
    assert config_from_dict({**config_dict(TINY), "seed_002_task_weights": True}).task_weights is False  # new wins


def test_unknown_keys_are_ignored_and_missing_ones_keep_the_base():
    cfg = config_from_dict({"dataset": "catalogue", "processes": 2, "extra_training_rows": 5, "data_dir": ""},
                           base=TINY)
    assert cfg == replace(TINY, dataset="catalogue")
