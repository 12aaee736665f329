"""Classification transfer protocols (MAE fine-tuning, linear probes, kNN) on ImageFolder,
iNaturalist 2019 and Places365 data; the commands are ``transfer/{finetune,linprobe,inat,places}.py``."""
