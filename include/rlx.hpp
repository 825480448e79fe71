// rlx.hpp — a small header-only C++17 wrapper over the C API in rlx.h.
//
// Handles become move-only RAII objects (rlx::Model, rlx::Trainer), buffers become
// std::vector / std::string (grown and retried when the C call reports RLX_BUFFER_TOO_SMALL),
// and a failed call throws rlx::Error carrying the status and rlx_last_error()'s message.
//
// Without exceptions (-fno-exceptions, or RLX_NO_EXCEPTIONS defined before including this
// header) a failed call returns an empty value instead and rlx::last_status() /
// rlx::last_message() say what went wrong; check them after each call.
//
// Thread-safety is the C API's: a Model may be used from many threads at once; a Trainer by
// one thread at a time (overlapping calls fail with RLX_INVALID_ARGUMENT).
#ifndef RLX_HPP
#define RLX_HPP

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "rlx.h"

#if !defined(RLX_NO_EXCEPTIONS) && (defined(__cpp_exceptions) || defined(__EXCEPTIONS))
#define RLX_HPP_EXCEPTIONS 1
#include <stdexcept>
#else
#define RLX_HPP_EXCEPTIONS 0
#endif

namespace rlx {

#if RLX_HPP_EXCEPTIONS
/// A failed rlx call: the status and the library's message.
class Error : public std::runtime_error {
 public:
  Error(rlx_status status, const std::string& message)
      : std::runtime_error(message), status_(status) {}
  rlx_status status() const noexcept { return status_; }

 private:
  rlx_status status_;
};
#endif

namespace detail {
struct LastError {
  rlx_status status = RLX_OK;
  std::string message;
};
inline LastError& last_error() {
  thread_local LastError e;
  return e;
}
/// Records the outcome of a C call; on failure throws (or, without exceptions, returns false).
inline bool check(rlx_status status) {
  LastError& e = last_error();
  e.status = status;
  e.message = status == RLX_OK ? std::string() : std::string(rlx_last_error());
#if RLX_HPP_EXCEPTIONS
  if (status != RLX_OK) throw Error(status, e.message);
#endif
  return status == RLX_OK;
}

/// Packs sequences back to back for the C calls that take (tokens, lengths).
struct Packed {
  std::vector<uint32_t> tokens;
  std::vector<uint8_t> mask;
  std::vector<size_t> lengths;
};
inline Packed pack(const std::vector<std::vector<uint32_t>>& seqs,
                   const std::vector<std::vector<uint8_t>>* masks = nullptr) {
  Packed p;
  for (size_t i = 0; i < seqs.size(); ++i) {
    p.tokens.insert(p.tokens.end(), seqs[i].begin(), seqs[i].end());
    if (masks != nullptr && i < masks->size()) {
      p.mask.insert(p.mask.end(), (*masks)[i].begin(), (*masks)[i].end());
    }
    p.lengths.push_back(seqs[i].size());
  }
  return p;
}
/// Owns a handle and frees it with the C API's `*_free` (move-only, like the classes below).
template <typename T, void (*Free)(T*)>
struct Deleter {
  void operator()(T* p) const noexcept { Free(p); }
};
template <typename T, void (*Free)(T*)>
using Owned = std::unique_ptr<T, Deleter<T, Free>>;
}  // namespace detail

/// The status of this thread's last rlx.hpp call (RLX_OK after a success).
inline rlx_status last_status() { return detail::last_error().status; }
/// The message of this thread's last failed rlx.hpp call ("" after a success).
inline const std::string& last_message() { return detail::last_error().message; }

/// A generated continuation: the new tokens and each one's log-prob.
struct Generation {
  std::vector<uint32_t> tokens;
  std::vector<float> logprobs;
};

/// One chat message for Model::apply_chat_template.
struct ChatMessage {
  std::string role;
  std::string content;
};

/// A loaded model (rlx_model). Move-only (a std::unique_ptr inside); freed on destruction.
class Model {
 public:
  Model() = default;
  /// Takes ownership of a handle from the C API.
  explicit Model(rlx_model* handle) : handle_(handle) {}

  /// Loads an HF folder, a .safetensors file or a .gguf file.
  static Model load(const std::string& path, uint32_t threads = 0) {
    rlx_model_params params = rlx_model_default_params();
    params.threads = threads;
    rlx_model* handle = nullptr;
    detail::check(rlx_model_load(path.c_str(), &params, &handle));
    return Model(handle);
  }

  explicit operator bool() const noexcept { return handle_ != nullptr; }
  rlx_model* get() const noexcept { return handle_.get(); }
  size_t vocab_size() const { return rlx_model_vocab_size(handle_.get()); }
  size_t context_length() const { return rlx_model_context_length(handle_.get()); }

  std::vector<uint32_t> tokenize(const std::string& text, bool add_special = true) const {
    std::vector<uint32_t> ids(text.size() + 8);
    size_t n = 0;
    rlx_status s = rlx_tokenize(handle_.get(), text.c_str(), add_special, ids.data(), ids.size(), &n);
    if (s == RLX_BUFFER_TOO_SMALL) {
      ids.resize(n);
      s = rlx_tokenize(handle_.get(), text.c_str(), add_special, ids.data(), ids.size(), &n);
    }
    if (!detail::check(s)) return {};
    ids.resize(n);
    return ids;
  }

  std::string detokenize(const std::vector<uint32_t>& ids, bool skip_special = true) const {
    std::string text(ids.size() * 8 + 16, '\0');
    size_t n = 0;
    rlx_status s =
        rlx_detokenize(handle_.get(), ids.data(), ids.size(), skip_special, &text[0], text.size(), &n);
    if (s == RLX_BUFFER_TOO_SMALL) {
      text.resize(n);
      s = rlx_detokenize(handle_.get(), ids.data(), ids.size(), skip_special, &text[0], text.size(), &n);
    }
    if (!detail::check(s)) return {};
    text.resize(n);
    return text;
  }

  /// Renders messages with the model's chat template (tokenize the result with
  /// add_special = false).
  std::string apply_chat_template(const std::vector<ChatMessage>& messages,
                                  bool add_generation_prompt = true) const {
    std::vector<rlx_chat_message> msgs;
    msgs.reserve(messages.size());
    for (const ChatMessage& m : messages) msgs.push_back({m.role.c_str(), m.content.c_str()});
    std::string text(256, '\0');
    size_t n = 0;
    rlx_status s = rlx_apply_chat_template(handle_.get(), msgs.data(), msgs.size(),
                                           add_generation_prompt, &text[0], text.size(), &n);
    if (s == RLX_BUFFER_TOO_SMALL) {
      text.resize(n);
      s = rlx_apply_chat_template(handle_.get(), msgs.data(), msgs.size(), add_generation_prompt,
                                  &text[0], text.size(), &n);
    }
    if (!detail::check(s)) return {};
    text.resize(n);
    return text;
  }

  /// Generates a continuation. `on_token(token, logprob)` (optional) sees each new token as
  /// it is sampled; returning false stops generation. It must not throw.
  Generation generate(const std::vector<uint32_t>& prompt,
                      const rlx_sampling_params& params = rlx_sampling_default_params(),
                      std::function<bool(uint32_t, float)> on_token = nullptr) const {
    Generation g;
    g.tokens.resize(params.max_new_tokens);
    g.logprobs.resize(params.max_new_tokens);
    size_t n = 0;
    rlx_token_callback callback = nullptr;
    void* user_data = nullptr;
    if (on_token) {
      callback = [](uint32_t token, float logprob, void* data) -> bool {
        return (*static_cast<std::function<bool(uint32_t, float)>*>(data))(token, logprob);
      };
      user_data = &on_token;
    }
    rlx_status s = rlx_generate_stream(handle_.get(), prompt.data(), prompt.size(), &params, callback,
                                       user_data, g.tokens.data(), g.logprobs.data(),
                                       g.tokens.size(), &n);
    if (!detail::check(s)) return {};
    g.tokens.resize(n);
    g.logprobs.resize(n);
    return g;
  }

  /// log p(tokens[t] | tokens[<t]) for t = 1..n-1.
  std::vector<float> logprobs(const std::vector<uint32_t>& tokens, float temperature = 1.0f) const {
    std::vector<float> out(tokens.empty() ? 0 : tokens.size() - 1);
    size_t n = 0;
    if (!detail::check(rlx_logprobs(handle_.get(), tokens.data(), tokens.size(), temperature,
                                    out.data(), out.size(), &n))) {
      return {};
    }
    out.resize(n);
    return out;
  }

  /// The reward of each sequence (models with a score head).
  std::vector<float> reward_scores(const std::vector<std::vector<uint32_t>>& seqs) const {
    detail::Packed p = detail::pack(seqs);
    std::vector<float> out(seqs.size());
    size_t n = 0;
    if (!detail::check(rlx_reward_score(handle_.get(), p.tokens.data(), p.tokens.size(),
                                        p.lengths.data(), p.lengths.size(), out.data(),
                                        out.size(), &n))) {
      return {};
    }
    out.resize(n);
    return out;
  }

 private:
  detail::Owned<rlx_model, rlx_model_free> handle_;
};

/// A reward model (rlx_reward_model: a *ForSequenceClassification checkpoint). Move-only; freed
/// on destruction; any number of threads may score with it at once.
class RewardModel {
 public:
  RewardModel() = default;
  explicit RewardModel(rlx_reward_model* handle) : handle_(handle) {}

  static RewardModel load(const std::string& path, uint32_t threads = 0) {
    rlx_model_params params = rlx_model_default_params();
    params.threads = threads;
    rlx_reward_model* handle = nullptr;
    detail::check(rlx_reward_model_load(path.c_str(), &params, &handle));
    return RewardModel(handle);
  }

  explicit operator bool() const noexcept { return handle_ != nullptr; }
  rlx_reward_model* get() const noexcept { return handle_.get(); }

  /// The reward of each sequence, read at its last token.
  std::vector<float> scores(const std::vector<std::vector<uint32_t>>& seqs) const {
    detail::Packed p = detail::pack(seqs);
    std::vector<float> out(seqs.size());
    size_t n = 0;
    if (!detail::check(rlx_reward_model_score(handle_.get(), p.tokens.data(), p.tokens.size(),
                                              p.lengths.data(), p.lengths.size(), out.data(),
                                              out.size(), &n))) {
      return {};
    }
    out.resize(n);
    return out;
  }

 private:
  detail::Owned<rlx_reward_model, rlx_reward_model_free> handle_;
};

/// A model under training with AdamW (rlx_trainer). Move-only; freed on destruction.
class Trainer {
 public:
  Trainer() = default;
  explicit Trainer(rlx_trainer* handle) : handle_(handle) {}

  static Trainer create(const std::string& path,
                        const rlx_trainer_params& params = rlx_trainer_default_params()) {
    rlx_trainer* handle = nullptr;
    detail::check(rlx_trainer_create(path.c_str(), &params, &handle));
    return Trainer(handle);
  }

  /// Continues from a checkpoint written by save().
  static Trainer resume(const std::string& path, uint32_t threads = 0) {
    rlx_trainer* handle = nullptr;
    detail::check(rlx_trainer_resume(path.c_str(), threads, &handle));
    return Trainer(handle);
  }

  explicit operator bool() const noexcept { return handle_ != nullptr; }
  rlx_trainer* get() const noexcept { return handle_.get(); }

  /// Writes a checkpoint folder (never over an existing one).
  bool save(const std::string& path) const {
    return detail::check(rlx_trainer_save(handle_.get(), path.c_str()));
  }

  /// A model holding the current weights (for generate / logprobs / reward_scores).
  Model model() const {
    rlx_model* handle = nullptr;
    detail::check(rlx_trainer_model(handle_.get(), &handle));
    return Model(handle);
  }

  /// One SFT step: mean cross-entropy over the tokens whose mask byte is non-zero.
  rlx_step_stats sft_step(const std::vector<std::vector<uint32_t>>& seqs,
                          const std::vector<std::vector<uint8_t>>& masks) const {
    detail::Packed p = detail::pack(seqs, &masks);
    rlx_step_stats stats{};
    detail::check(rlx_trainer_sft_step(handle_.get(), p.tokens.data(), p.mask.data(), p.tokens.size(),
                                       p.lengths.data(), p.lengths.size(), &stats));
    return stats;
  }

  /// One reward-model step on (chosen, rejected) pairs.
  rlx_step_stats rm_step(const std::vector<std::vector<uint32_t>>& chosen,
                         const std::vector<std::vector<uint32_t>>& rejected,
                         float margin = 0.0f) const {
    detail::Packed c = detail::pack(chosen);
    detail::Packed r = detail::pack(rejected);
    rlx_step_stats stats{};
    detail::check(rlx_trainer_rm_step(handle_.get(), c.tokens.data(), c.tokens.size(),
                                      c.lengths.data(), r.tokens.data(), r.tokens.size(),
                                      r.lengths.data(), chosen.size(), margin, &stats));
    return stats;
  }

  /// One DPO step; `ref_chosen` / `ref_rejected` are the reference's summed response log-probs.
  rlx_step_stats dpo_step(const std::vector<std::vector<uint32_t>>& chosen,
                          const std::vector<std::vector<uint8_t>>& chosen_masks,
                          const std::vector<std::vector<uint32_t>>& rejected,
                          const std::vector<std::vector<uint8_t>>& rejected_masks,
                          const std::vector<double>& ref_chosen,
                          const std::vector<double>& ref_rejected,
                          const rlx_dpo_params& params = rlx_dpo_default_params()) const {
    detail::Packed c = detail::pack(chosen, &chosen_masks);
    detail::Packed r = detail::pack(rejected, &rejected_masks);
    rlx_step_stats stats{};
    detail::check(rlx_trainer_dpo_step(
        handle_.get(), c.tokens.data(), c.mask.data(), c.tokens.size(), c.lengths.data(),
        r.tokens.data(), r.mask.data(), r.tokens.size(), r.lengths.data(), chosen.size(),
        ref_chosen.data(), ref_rejected.data(), &params, &stats));
    return stats;
  }

  /// One GRPO step. `old_logprobs` may be empty ("this very policy"); `ref_logprobs` is needed
  /// when β > 0. Both hold one value per response token, packed.
  rlx_step_stats grpo_step(const std::vector<std::vector<uint32_t>>& seqs,
                           const std::vector<std::vector<uint8_t>>& masks,
                           const std::vector<float>& advantages,
                           const std::vector<float>& old_logprobs,
                           const std::vector<float>& ref_logprobs,
                           const rlx_grpo_params& params = rlx_grpo_default_params()) const {
    detail::Packed p = detail::pack(seqs, &masks);
    size_t n_resp = old_logprobs.empty() ? ref_logprobs.size() : old_logprobs.size();
    rlx_step_stats stats{};
    detail::check(rlx_trainer_grpo_step(
        handle_.get(), p.tokens.data(), p.mask.data(), p.tokens.size(), p.lengths.data(),
        p.lengths.size(), advantages.data(), old_logprobs.empty() ? nullptr : old_logprobs.data(),
        ref_logprobs.empty() ? nullptr : ref_logprobs.data(), n_resp, &params, &stats));
    return stats;
  }

 private:
  detail::Owned<rlx_trainer, rlx_trainer_free> handle_;
};

}  // namespace rlx

#endif  // RLX_HPP
