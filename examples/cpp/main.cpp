// The four primitives of rlx from C++ through the RAII wrapper rlx.hpp: generate (streaming),
// log-probs, gradient steps (SFT, then GRPO on sampled answers) and reward scores.
//
//   rlx_example_cpp MODEL [PROMPT]
#include <cstdio>
#include <filesystem>
#include <random>
#include <iostream>
#include <string>
#include <vector>

#include "rlx.hpp"

int main(int argc, char** argv) {
  const std::string path = argc > 1 ? argv[1] : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  const std::string question = argc > 2 ? argv[2] : "What is the capital of France?";
  try {
    rlx::Model model = rlx::Model::load(path);

    std::vector<uint32_t> prompt;
    try {
      prompt = model.tokenize(model.apply_chat_template({{"user", question}}), false);
    } catch (const rlx::Error&) {  // no chat template: the plain text
      prompt = model.tokenize(question);
    }

    // 1. Generate with a streaming callback (it could stop generation by returning false).
    rlx_sampling_params sp = rlx_sampling_default_params();
    sp.max_new_tokens = 12;
    sp.temperature = 0.0f;
    size_t streamed = 0;
    rlx::Generation g = model.generate(prompt, sp, [&](uint32_t token, float) {
      std::cout << model.detokenize({token}) << std::flush;
      ++streamed;
      return true;
    });
    std::cout << "\n";
    if (streamed != g.tokens.size()) return 1;

    // 2. Log-probs of the whole sequence equal generation's, bit for bit.
    std::vector<uint32_t> seq = prompt;
    seq.insert(seq.end(), g.tokens.begin(), g.tokens.end());
    std::vector<float> lp = model.logprobs(seq);
    for (size_t i = 0; i < g.tokens.size(); ++i) {
      if (lp[prompt.size() - 1 + i] != g.logprobs[i]) return 1;
    }
    std::cout << "log-probs match generation for " << g.tokens.size() << " tokens\n";

    // 3. Gradient steps: SFT on the answer, then GRPO on four sampled answers.
    rlx_trainer_params tp = rlx_trainer_default_params();
    tp.lr = 1e-4f;
    tp.lora_rank = 8;
    rlx::Trainer trainer = rlx::Trainer::create(path, tp);
    std::vector<uint8_t> mask(seq.size(), 0);
    for (size_t i = prompt.size(); i < seq.size(); ++i) mask[i] = 1;
    rlx_step_stats a = trainer.sft_step({seq}, {mask});
    rlx_step_stats b = trainer.sft_step({seq}, {mask});
    std::printf("SFT loss %.4f -> %.4f\n", a.loss, b.loss);
    if (!(b.loss < a.loss)) return 1;

    rlx::Model policy = trainer.model();
    std::vector<std::vector<uint32_t>> group;
    std::vector<std::vector<uint8_t>> masks;
    std::vector<float> old_lp, rewards;
    sp.temperature = 1.0f;
    sp.max_new_tokens = 6;
    sp.ignore_eos = true;
    for (uint64_t k = 0; k < 4; ++k) {
      sp.seed = k;
      rlx::Generation s = policy.generate(prompt, sp);
      std::vector<uint32_t> full = prompt;
      full.insert(full.end(), s.tokens.begin(), s.tokens.end());
      std::vector<uint8_t> m(full.size(), 0);
      for (size_t i = prompt.size(); i < full.size(); ++i) m[i] = 1;
      group.push_back(full);
      masks.push_back(m);
      old_lp.insert(old_lp.end(), s.logprobs.begin(), s.logprobs.end());
      rewards.push_back(static_cast<float>(k % 2));  // a stand-in reward
    }
    std::vector<float> adv(rewards.size());
    if (rlx_group_advantages(rewards.data(), rewards.size(), rewards.size(), true, adv.data(),
                             adv.size()) != RLX_OK) {
      return 1;
    }
    rlx_grpo_params gp = rlx_grpo_default_params();
    gp.beta = 0.0;  // no reference model in this example
    rlx_step_stats gs = trainer.grpo_step(group, masks, adv, old_lp, {}, gp);
    std::printf("GRPO step %llu: loss %.4f, clipped %.2f\n",
                static_cast<unsigned long long>(gs.step), gs.loss, gs.clip_fraction);
    if (gs.clip_fraction != 0.0) return 1;  // the sampler is the policy: ratios are exactly 1

    // 4. Reward scores from a score head.
    rlx_trainer_params rp = rlx_trainer_default_params();
    rp.head = RLX_HEAD_SCORE;
    rp.lora_rank = 8;
    rlx::Model reward_model = rlx::Trainer::create(path, rp).model();
    std::vector<float> scores = reward_model.reward_scores(group);
    std::printf("rewards of %zu answers computed\n", scores.size());
    if (scores.size() != group.size()) return 1;

    // A saved reward model loads as its own handle and scores the same.
    rlx_trainer_params rp2 = rlx_trainer_default_params();
    rp2.head = RLX_HEAD_SCORE;
    rlx::Trainer rm_trainer = rlx::Trainer::create(path, rp2);
    const std::filesystem::path saved =
        std::filesystem::temp_directory_path() /
        ("rlx_example_rm_" + std::to_string(std::random_device{}()));
    rm_trainer.save(saved.string());
    {
      rlx::RewardModel rm = rlx::RewardModel::load(saved.string());  // a checkpoint is a model folder
      std::vector<float> a = rm.scores(group);
      std::vector<float> b = rm_trainer.model().reward_scores(group);
      std::filesystem::remove_all(saved);
      if (a != b) return 1;
      std::printf("reward model handle: %zu scores, equal to the trainer's\n", a.size());
    }

    // Errors are exceptions carrying rlx's message.
    try {
      rlx::Model::load("/no/such/model");
      return 1;
    } catch (const rlx::Error& e) {
      std::cout << "expected error: " << e.what() << "\n";
    }
  } catch (const rlx::Error& e) {
    std::cerr << "rlx error: " << e.what() << "\n";
    return 1;
  }
  std::cout << "all checks passed\n";
  return 0;
}
