"""GAN methods (StyleGAN2 family): sources in the rosinality checkpoint format, shared losses,
``gan_finetune``, ``dcl``, and source pretraining (``GANPretrain``)."""
