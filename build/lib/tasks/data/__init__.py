"""The data path of stage 1, as plain functions (no model, no torch, no Prefect):
``sources`` reads files, folders and hub datasets; ``formats`` turns rows into conversation turns;
``validate`` checks them and counts drops; ``encode`` renders, tokenizes and splits; ``report``
describes the result."""
