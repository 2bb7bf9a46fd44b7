"""The column descriptions of the built-in analyses' docs (``sections.doc_columns`` of
``docs/<analysis>.md``), for installs without the docs. Written by ``sections.write_snapshot``;
do not edit by hand."""

COLUMNS = {'activation_norms': {'activation_norms.csv': {'': 'activation_norms.csv, one row per (model, dataset, '
                                                   'layer), sorted by those',
                                               'model': "the model's label (name, else alias, folder/file "
                                                        'stem, or hub id with / as __)',
                                               'dataset': "the dataset's name",
                                               'layer': '0 = embedding output, 1..L = output of block 1..L '
                                                        '(the last after the final norm)',
                                               'n_tokens': 'non-padding tokens of the dataset after '
                                                           'truncation (the same for every layer)',
                                               'n_tokens_dropped': "tokens of the dataset's texts beyond "
                                                                   "max_length (or the model's context), cut "
                                                                   'off and not measured (0 when none)',
                                               'mean_<stat>': 'mean of the statistic over all those tokens '
                                                              '(mean_norm: the mean L2 norm)',
                                               'std_<stat>': 'population standard deviation over tokens '
                                                             '(divides by n_tokens)',
                                               'min_<stat>': 'smallest and largest per-token value',
                                               'max_<stat>': 'smallest and largest per-token value',
                                               'n_nonfinite_<stat>': 'tokens whose value of the statistic is '
                                                                     'not finite (NaN or inf, e.g. after a '
                                                                     'block whose weights hold NaN); when it '
                                                                     'is above 0, the mean, std, min and max '
                                                                     'of that row are not finite either '
                                                                     '(NaN, or inf; an empty cell in the CSV '
                                                                     'is NaN)'}},
 'layer_sweep': {'representation_metrics.csv': {'': 'one row per (checkpoint, state, metrics dataset or '
                                                    'task, layer): model, revision, state columns, dataset '
                                                    '(the metrics dataset, or the task whose own texts were '
                                                    'measured), source (dataset or task), layer, '
                                                    'prompt_entropy, dataset_entropy, curvature, '
                                                    'effective_rank (raw), then the '
                                                    '[normalised](#representation-metrics) '
                                                    'prompt_entropy_<n> and dataset_entropy_<n> for n in '
                                                    "logN, logD, maxEntropy (information_flow's default), "
                                                    'logNlogD, and curvature_logD (empty in rows stored '
                                                    'before they were computed), n_texts (texts taken), '
                                                    'n_prompts (texts measured: those with at least one '
                                                    "token), sample_seed (metric_seed of a task's draw; "
                                                    'empty for metrics datasets), alpha, n_nonfinite_texts '
                                                    '(texts whose mean-pooled states at that layer are NaN '
                                                    'or inf; the metrics are then empty (NaN); empty when '
                                                    "unknown), layer_norm (the metrics' embedding, the "
                                                    'metrics_layer_norm option), model_last_layer (both '
                                                    'empty in rows stored before they were kept)',
                                                'prompt_entropy_maxEntropy': 'min(log N, log D), the largest '
                                                                             'value the entropy can take (so '
                                                                             "0..1): **information_flow's "
                                                                             "default** (compute_entropy's "
                                                                             "normalizations=['maxEntropy'], "
                                                                             'first in '
                                                                             'EvaluationMetricSpecifications)',
                                                'dataset_entropy_maxEntropy': 'min(log N, log D), the '
                                                                              'largest value the entropy can '
                                                                              'take (so 0..1): '
                                                                              "**information_flow's "
                                                                              "default** (compute_entropy's "
                                                                              "normalizations=['maxEntropy'], "
                                                                              'first in '
                                                                              'EvaluationMetricSpecifications)',
                                                'prompt_entropy_logN': 'log N',
                                                'dataset_entropy_logN': 'log N',
                                                'prompt_entropy_logD': 'log D',
                                                'dataset_entropy_logD': 'log D',
                                                'prompt_entropy_logNlogD': 'log N · log D',
                                                'dataset_entropy_logNlogD': 'log N · log D',
                                                'curvature_logD': "log D (information_flow's "
                                                                  'compute_curvature gives raw and logD)'},
                 'layer_sweep.csv': {'': "one row per (checkpoint, state, layer, task): model (the model's "
                                         'label), revision (the hub revision; empty for local models), the '
                                         "state's columns when a perturbation grid is swept "
                                         '(degradation_method, param_group_name, level_value, repeat_index, '
                                         "seed, is_baseline), layer, task, task_type (MTEB's: "
                                         'Classification, Clustering, PairClassification, STS, Reranking, '
                                         "Retrieval), main_score (the task's MTEB main score, to 6 decimals "
                                         "as in MTEB's result files), n_texts (texts the task hands the "
                                         'encoder in one evaluation, as MTEB selects them), '
                                         'n_nonfinite_texts (distinct texts of the work item whose pooled '
                                         'embedding at that layer is NaN or inf; main_score is then empty '
                                         '(NaN); empty when unknown, see [Non-finite '
                                         'values](#non-finite-values)), layer_norm (the embedding: final or '
                                         "none, the layer_norm option), model_last_layer (the model's last "
                                         'hidden-state index n; the sweep always scores it). Both are empty '
                                         'in rows stored before they were kept. layer_norm is a column, not '
                                         "part of a checkpoint's name, unless the table holds two settings"},
                 'progress.csv': {'': 'one row per (checkpoint, layer, task) evaluation, appended as each '
                                      'finishes (watch it with tail -f): model, revision, state (the model '
                                      "state's id), layer, task, status (done), main_score, duration_s "
                                      "(seconds for that layer's evaluation; the first layer of a task also "
                                      "carries its forward passes; a layer read back from MTEB's cache on "
                                      'resume keeps the seconds it first took, from mteb_provenance/), time '
                                      '(UTC, when it finished). The merge rewrites it from the stored '
                                      'results, one row per evaluation'},
                 'summary_layer_by_task.csv': {'': 'the layer x task table: model, revision, state columns, '
                                                   'layer, one column per task (its main score), mean (over '
                                                   "tasks; empty when a task's score is)"},
                 'summary_task_type.csv': {'': 'model, revision, state columns, layer, task_type, '
                                               'mean_main_score (mean over the tasks of that type; empty '
                                               'when one of their scores is), n_tasks'},
                 'best_layers.csv': {'': 'per (checkpoint, state, task), and per checkpoint with task = '
                                         '(mean over tasks): best_layer (the earliest layer with the highest '
                                         'score, among the layers that have one; empty when none has), '
                                         "best_score, last_layer (the model's last layer, model_last_layer, "
                                         'which the sweep always scores, whatever layers asks), '
                                         'last_layer_source (model; last swept for records stored before '
                                         'model_last_layer was kept: last_layer is then the highest layer '
                                         "swept, which need not be the model's last), last_score, "
                                         'gain_over_last (best minus last), n_layers (layers swept)'},
                 'layer_metrics_scores.csv': {'': 'written when the run has both scores and metrics: each '
                                                  'row of layer_sweep.csv joined with the metrics of its '
                                                  '(checkpoint, state, layer), one row per metrics dataset: '
                                                  'model, revision, state columns, layer, task, task_type, '
                                                  'main_score, dataset, source, every metric column of '
                                                  'representation_metrics.csv (raw and normalised), '
                                                  "metrics_layer_norm (the metrics' layer_norm), "
                                                  "model_last_layer. A task's own texts (source = task) join "
                                                  'that task only; a metrics dataset joins every task'},
                 'metric_score_correlation.csv': {'': "with the joined table: Spearman's correlation between "
                                                      'each metric and the main score, over the (checkpoint, '
                                                      'state, layer) points: dataset (a metrics dataset, or '
                                                      "(each task's texts) for the metrics of the tasks' own "
                                                      'texts, pooled), metric, task_type (a type, or (all '
                                                      'tasks)), n_tasks (tasks averaged), n (points where '
                                                      'both are finite), spearman_rho, ci95_low, ci95_high '
                                                      "(95% interval: Fisher z with Bonett and Wright's "
                                                      'standard error sqrt((1 + rho²/2) / (n - 3)); empty '
                                                      "below 4 points), p_value (scipy.stats.spearmanr's). A "
                                                      "point's score is the mean main score over the tasks "
                                                      "of that type; its metric is the dataset's, or, for "
                                                      "(each task's texts), the mean over those tasks of the "
                                                      "metric of each task's own texts. Empty where n < 3 or "
                                                      'one side is constant'}},
 'logit_lens': {'logit_lens.csv': {'': 'logit_lens.csv, one row per (model, dataset, state, layer)',
                                   'model': "the model's label",
                                   'dataset': "the dataset's name",
                                   'degradation_method': 'the perturbed state (only with a perturbation '
                                                         'grid)',
                                   'param_group_name': 'the perturbed state (only with a perturbation grid)',
                                   'level_value': 'the perturbed state (only with a perturbation grid)',
                                   'repeat_index': 'the perturbed state (only with a perturbation grid)',
                                   'seed': 'the perturbed state (only with a perturbation grid)',
                                   'is_baseline': 'the perturbed state (only with a perturbation grid)',
                                   'layer': "0 = embedding output, L = the model's output",
                                   'n_tokens': "predicting positions scored (each text's length − 1 after "
                                               'truncation)',
                                   'n_texts': 'texts with at least one predicting position (the units of the '
                                              'interval)',
                                   'top1_agreement': 'the means over n_tokens (table above)',
                                   'top1_accuracy': 'the means over n_tokens (table above)',
                                   'kl_to_final': 'the means over n_tokens (table above)',
                                   'entropy': 'the means over n_tokens (table above)',
                                   '<metric>_ci_low': 'the 95% interval of each mean over texts (NaN with '
                                                      'fewer than 2 texts)',
                                   '<metric>_ci_high': 'the 95% interval of each mean over texts (NaN with '
                                                       'fewer than 2 texts)'}},
 'loop_identity': {'loop_metrics.csv': {'': 'loop_metrics.csv: one row per (model, dataset, perturbed state '
                                            'if any, loop count); the baseline',
                                        'model': "the model's label: baseline (or the baseline's name), else "
                                                 "the checkpoint's folder name",
                                        'role': 'baseline or checkpoint',
                                        'step': "the checkpoint's step (trailing number of its name); empty "
                                                'for the baseline',
                                        'dataset': "the dataset's name",
                                        'loop_count': 'k, passes through blocks start..end (0 = none: h_out '
                                                      '= h_in)',
                                        'n_tokens': 'non-padding tokens the metrics are averaged over '
                                                    "(without each text's first with skip_first_position)",
                                        'n_nonfinite_tokens': 'of those, tokens with a non-finite (NaN or '
                                                              "inf) value of any metric; above 0, the row's "
                                                              'means, stds and medians are NaN',
                                        'cosine_mean': 'mean, population std and median (lower median, '
                                                       'within 0.1%) over tokens of cos(h_in, h_out(k))',
                                        'cosine_std': 'mean, population std and median (lower median, within '
                                                      '0.1%) over tokens of cos(h_in, h_out(k))',
                                        'cosine_median': 'mean, population std and median (lower median, '
                                                         'within 0.1%) over tokens of cos(h_in, h_out(k))',
                                        'mse_mean': 'of the per-token MSE over hidden dimensions',
                                        'mse_std': 'of the per-token MSE over hidden dimensions',
                                        'mse_median': 'of the per-token MSE over hidden dimensions',
                                        'norm_diff_mean': 'of ‖h_out(k)‖ - ‖h_in‖',
                                        'norm_diff_std': 'of ‖h_out(k)‖ - ‖h_in‖',
                                        'norm_diff_median': 'of ‖h_out(k)‖ - ‖h_in‖',
                                        'step_cosine_mean': 'of cos(h_out(k), h_out(k-1)); empty at k = 0',
                                        'step_cosine_std': 'of cos(h_out(k), h_out(k-1)); empty at k = 0',
                                        'step_cosine_median': 'of cos(h_out(k), h_out(k-1)); empty at k = 0',
                                        'step_rel_change_mean': 'of ‖h_out(k) - h_out(k-1)‖ / ‖h_out(k-1)‖; '
                                                                'empty at k = 0',
                                        'step_rel_change_std': 'of ‖h_out(k) - h_out(k-1)‖ / ‖h_out(k-1)‖; '
                                                               'empty at k = 0',
                                        'step_rel_change_median': 'of ‖h_out(k) - h_out(k-1)‖ / '
                                                                  '‖h_out(k-1)‖; empty at k = 0',
                                        'perplexity': 'exp(summed next-token NLL / count) of the model with '
                                                      'k passes, over the dataset; empty with perplexity: '
                                                      'false',
                                        'perplexity_tokens': 'the predicted tokens it counts (n_tokens minus '
                                                             'one per text); 0 with perplexity: false'}},
 'memory_ablation': {'examples.csv': {'': 'intervention (family name, baseline), transform, target (the '
                                          "varying value, JSON), draw (random sets: which draw), the row's "
                                          'split, bucket, hops, cot, known, pair_id/chain_id/link where the '
                                          'dataset has them, index (row number in its split), answer, '
                                          'prediction, exact, answer_prob, answer_rank, answer_entropy, '
                                          'n_nonfinite_positions, generated, generated_exact (empty in '
                                          'records stored before generation), digit_accuracy, group'},
                     'accuracy.csv': {'': 'per state and group: intervention, transform, target, group '
                                          "(bucket=4/seen, ...), the group's fields, n, exact_match, "
                                          'digit_accuracy, answer_prob, answer_rank, answer_entropy, '
                                          'generated_exact_match (share of rows whose greedy answer is '
                                          "right), n_nonfinite_positions (summed over the group's rows; NaN: "
                                          "unknown), exact_drop and digit_drop (the unablated model's value "
                                          "minus this state's, same group); exact_match_ci_low, "
                                          'exact_match_ci_high (its 95% Wilson interval; '
                                          'generated_exact_match_ci_low, generated_exact_match_ci_high '
                                          'likewise, over the rows with a greedy answer), '
                                          'digit_accuracy_ci_low, digit_accuracy_ci_high (95% t interval '
                                          "over the group's rows), exact_drop_ci_low, exact_drop_ci_high, "
                                          'digit_drop_ci_low, digit_drop_ci_high (95% paired bootstrap '
                                          'intervals of the drops), exact_drop_p (exact McNemar test against '
                                          'the unablated model), digit_drop_p (Wilcoxon signed-rank test): '
                                          'see [Intervals](#intervals)'},
                     'position_impact.csv': {'': "the seed's analyze_ablation_by_position: per state and "
                                                 'answer-token position (0 = first answer token): n, '
                                                 "token_accuracy (NaN when a row's logits there are not "
                                                 'finite), token_accuracy_ci_low, token_accuracy_ci_high '
                                                 '(its 95% Wilson interval), n_nonfinite_positions (rows '
                                                 'whose logits there are not finite; NaN: unknown), drop '
                                                 'against the unablated model, drop_ci_low, drop_ci_high '
                                                 '(95% paired bootstrap interval), drop_p (exact McNemar '
                                                 'test; see [Intervals](#intervals))'},
                     'swap_predictions.csv': {'': "the seed's analyze_swap_predictions, for swap states: "
                                                  'each row whose answer changed: intervention, target, '
                                                  'split, index, answer, baseline_prediction, prediction '
                                                  '(the answer before and after the swap: the greedy '
                                                  'generated ones by default, the teacher-forced prediction '
                                                  'with swap_answers: teacher_forced or for records stored '
                                                  'before generation), follows (the index of the row of that '
                                                  'split whose answer the new one is, if any), compared '
                                                  '(generated or teacher_forced)'},
                     'random_sets.csv': {'': 'per random family and group: draws, and the _mean, _sd (across '
                                             'draws), _min and _max of exact_drop and digit_drop'},
                     'slot_usage.csv': {'': "the seed's analyze_key_occurrences: layer, slot, count (times "
                                            'read at answer positions), weight (summed softmax weight), '
                                            "share of the layer's reads"},
                     'key_statistics.csv': {'': "the seed's analyze_qa_key_statistics: per memory layer and "
                                                'slot read by the unablated model at answer positions (every '
                                                "head's top-k): rank (1 = most read in the layer; ties by "
                                                "slot), reads (times read; slot_usage's count), share (of "
                                                "the layer's reads), positions (answer positions, i.e. "
                                                'tokens, where any head reads it), rows (distinct rows, '
                                                'split and index, that read it), groups (distinct groups, '
                                                'e.g. bucket=32/seen, that read it), weight_mean, weight_std '
                                                '(mean and population standard deviation of the softmax '
                                                'weights it gets when read; weights are stored rounded to 5 '
                                                "decimals), weight_sum (slot_usage's weight), cluster (its "
                                                'co-read cluster, 0 the largest; empty outside the 64 '
                                                'most-read slots of the layer), cluster_size, leaf (its '
                                                "place in the clustering's dendrogram leaf order, the order "
                                                'of slot_pairs.png)'},
                     'memory_summary.csv': {'': 'layer, slots, used (slots read at least once), '
                                                'unused_share'},
                     'value_norms.csv': {'': "the seed's extract_value_vector_norms: layer, slot, value_norm "
                                             "(L2 norm of the slot's value vector)"},
                     'routing.csv': {'': "the seed's analyze_*_routing: layer, by (token_type: digit, word, "
                                         'operator, space; or position: token index in the row), value, '
                                         'reads, distinct_slots, top_slots (slot:count, the 10 most read)'}},
 'param_diff': {'per_matrix.csv': {'': 'per_matrix.csv, one row per (other checkpoint, matrix)',
                                   'other': 'label of the compared checkpoint',
                                   'name': "the tensor's name in the checkpoint",
                                   'layer': 'block index (-1 outside the blocks)',
                                   'module': 'path inside the block without .weight (self_attn.q_proj, '
                                             'mlp.down_proj, block_sparse_moe.experts.w1), or the name',
                                   'expert': 'the expert index of a mixture-of-experts matrix (empty for the '
                                             'others)',
                                   'shape': 'rows x columns',
                                   'numel': 'number of entries',
                                   'dW_fro': 'see above',
                                   'W_fro': 'see above',
                                   'rel_change': 'see above',
                                   'dW_spec': 'spectral norm of dW (never above the true value, up to '
                                              'rounding)',
                                   'dW_spec_iters': 'iterations used (one product with dW and one with dWᵀ '
                                                    'each; 0 for exact)',
                                   'dW_spec_converged': 'whether dW_spec_bound ≤ tol · dW_spec was certified '
                                                        '(always true for exact; see "What converged '
                                                        'guarantees")',
                                   'dW_spec_method': 'lanczos, power or exact: the method used '
                                                     "(spectral_method, and for auto the matrix's size, "
                                                     'decide)',
                                   'dW_spec_bound': 'the certified residual bound ρ/√2: a singular value of '
                                                    'dW lies within it of the estimate (0 for exact)',
                                   'dW_stable_rank': 'dW_fro² / dW_spec²; empty for an unchanged matrix (a '
                                                     'zero change has no stable rank)',
                                   'W_spec': 'the same for the base matrix',
                                   'W_spec_iters': 'the same for the base matrix',
                                   'W_spec_converged': 'the same for the base matrix',
                                   'W_spec_method': 'the same for the base matrix',
                                   'W_spec_bound': 'the same for the base matrix',
                                   'W_stable_rank': 'the same for the base matrix',
                                   'W_other_fro': "‖W'‖_F"},
                'per_layer.csv': {'': 'per_layer.csv, one row per (other, layer)',
                                  'other': 'as above',
                                  'layer': 'as above',
                                  'n_matrices': 'matrices of the layer compared',
                                  'n_changed': 'of those, matrices with a finite, non-zero change (dW_fro > '
                                               '0)',
                                  'n_nonfinite': 'of those, matrices whose change is not finite (dW_fro NaN '
                                                 "or inf: a NaN or inf in either checkpoint's matrix); "
                                                 'neither changed nor unchanged, so the unchanged matrices '
                                                 'are n_matrices - n_changed - n_nonfinite',
                                  'dW_fro_layer': "sqrt(Σ dW_fro²) over the layer's matrices: the Frobenius "
                                                  "norm of the whole layer's change",
                                  'W_fro_layer': 'sqrt(Σ W_fro²)',
                                  'rel_change_layer': 'dW_fro_layer / W_fro_layer',
                                  'mean_rel_change': "mean of rel_change over the layer's matrices",
                                  'mean_dW_spec': 'mean and largest dW_spec',
                                  'max_dW_spec': 'mean and largest dW_spec',
                                  'mean_dW_stable_rank': "mean of dW_stable_rank over the layer's changed "
                                                         'matrices (average complexity of its changes; empty '
                                                         'when none changed)',
                                  'mean_W_stable_rank': 'mean of W_stable_rank'}},
 'perturbation': {}}
