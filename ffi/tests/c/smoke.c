/*
 * A C program using include/rlx.h as a C caller would: version check, errors, load, tokenize,
 * generate, score, detokenize, free. Usage: smoke MODEL_DIR. Exit status 0 = all checks held.
 * Built and run by ffi/tests/c_smoke.rs.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rlx.h"

static int failures = 0;

#define CHECK(cond)                                                                 \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "%s:%d: check failed: %s (last error: \"%s\")\n",       \
                    __FILE__, __LINE__, #cond, rlx_last_error());                  \
            failures++;                                                             \
        }                                                                           \
    } while (0)

#define CHECK_STATUS(call, want)                                                    \
    do {                                                                            \
        rlx_status st_ = (call);                                                    \
        if (st_ != (want)) {                                                        \
            fprintf(stderr, "%s:%d: %s returned %s, expected %s (last error: \"%s\")\n", \
                    __FILE__, __LINE__, #call, rlx_status_string(st_),              \
                    rlx_status_string(want), rlx_last_error());                     \
            failures++;                                                             \
        }                                                                           \
    } while (0)

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL_DIR\n", argv[0]);
        return 2;
    }

    /* Header and library agree. */
    CHECK(rlx_version_number() == RLX_VERSION_NUMBER);
    char version[32];
    snprintf(version, sizeof version, "%d.%d.%d", RLX_VERSION_MAJOR, RLX_VERSION_MINOR,
             RLX_VERSION_PATCH);
    CHECK(strcmp(rlx_version_string(), version) == 0);

    /* Errors carry a status and a message; NULL is never dereferenced. */
    rlx_model *model = NULL;
    CHECK_STATUS(rlx_model_load(NULL, NULL, &model), RLX_NULL_POINTER);
    CHECK(strlen(rlx_last_error()) > 0);
    CHECK_STATUS(rlx_model_load("/nonexistent/model", NULL, &model), RLX_IO);
    CHECK(strstr(rlx_last_error(), "/nonexistent/model") != NULL);
    CHECK(model == NULL);
    rlx_model_free(NULL);
    CHECK(strcmp(rlx_last_error(), "") == 0);

    /* Load with explicit params. */
    rlx_model_params mp = rlx_model_default_params();
    mp.threads = 2;
    CHECK_STATUS(rlx_model_load(argv[1], &mp, &model), RLX_OK);
    if (model == NULL) {
        fprintf(stderr, "cannot continue without a model\n");
        return 1;
    }
    CHECK(strcmp(rlx_last_error(), "") == 0);
    size_t vocab = rlx_model_vocab_size(model);
    CHECK(vocab > 0);
    CHECK(rlx_model_context_length(model) > 0);

    /* Tokenize: ask for the size, then fill. */
    const char *text = "Hello world";
    size_t n_prompt = 0;
    CHECK_STATUS(rlx_tokenize(model, text, true, NULL, 0, &n_prompt), RLX_BUFFER_TOO_SMALL);
    CHECK(n_prompt > 0);
    uint32_t *prompt = malloc(n_prompt * sizeof *prompt);
    size_t n = 0;
    CHECK_STATUS(rlx_tokenize(model, text, true, prompt, n_prompt, &n), RLX_OK);
    CHECK(n == n_prompt);

    /* Greedy generation, twice: same tokens and log-probs. */
    rlx_sampling_params sp = rlx_sampling_default_params();
    sp.temperature = 0.0f;
    sp.max_new_tokens = 8;
    sp.ignore_eos = true;
    uint32_t toks[8], toks2[8];
    float lps[8], lps2[8];
    size_t n_new = 0, n_new2 = 0;
    CHECK_STATUS(rlx_generate(model, prompt, n_prompt, &sp, toks, lps, 4, &n_new),
                 RLX_BUFFER_TOO_SMALL);
    CHECK(n_new == 8);
    CHECK_STATUS(rlx_generate(model, prompt, n_prompt, &sp, toks, lps, 8, &n_new), RLX_OK);
    CHECK_STATUS(rlx_generate(model, prompt, n_prompt, &sp, toks2, lps2, 8, &n_new2), RLX_OK);
    CHECK(n_new == 8 && n_new2 == 8);
    CHECK(memcmp(toks, toks2, sizeof toks) == 0);
    CHECK(memcmp(lps, lps2, sizeof lps) == 0);

    /* Scoring prompt + generated gives the generate log-probs, bit for bit. */
    size_t n_full = n_prompt + n_new;
    uint32_t *full = malloc(n_full * sizeof *full);
    memcpy(full, prompt, n_prompt * sizeof *prompt);
    memcpy(full + n_prompt, toks, n_new * sizeof *toks);
    float *scores = malloc((n_full - 1) * sizeof *scores);
    CHECK_STATUS(rlx_logprobs(model, full, n_full, 1.0f, scores, n_full - 1, &n), RLX_OK);
    CHECK(n == n_full - 1);
    CHECK(memcmp(scores + (n_prompt - 1), lps, n_new * sizeof *lps) == 0);
    for (size_t i = 0; i < n; i++) CHECK(isfinite(scores[i]) && scores[i] <= 0.0f);

    /* Bad inputs. */
    uint32_t oov[2] = {0, (uint32_t)vocab};
    CHECK_STATUS(rlx_logprobs(model, oov, 2, 1.0f, scores, n_full - 1, &n), RLX_OUT_OF_RANGE);
    CHECK_STATUS(rlx_generate(model, NULL, 0, &sp, toks, lps, 8, &n), RLX_INVALID_ARGUMENT);
    CHECK_STATUS(rlx_generate(model, prompt, n_prompt, &sp, NULL, NULL, 8, &n),
                 RLX_NULL_POINTER);

    /* Detokenize: the size needed includes the NUL. */
    size_t need = 0;
    CHECK_STATUS(rlx_detokenize(model, full, n_full, true, NULL, 0, &need), RLX_BUFFER_TOO_SMALL);
    char *decoded = malloc(need);
    CHECK_STATUS(rlx_detokenize(model, full, n_full, true, decoded, need, &n), RLX_OK);
    CHECK(n + 1 == need && decoded[n] == '\0');
    CHECK(strstr(decoded, "Hello") != NULL);
    printf("rlx %s: \"%s\"\n", rlx_version_string(), decoded);

    free(decoded);
    free(scores);
    free(full);
    free(prompt);
    rlx_model_free(model);

    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("smoke: all checks passed\n");
    return 0;
}
